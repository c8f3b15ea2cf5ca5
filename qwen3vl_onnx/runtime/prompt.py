"""From chat messages to a tokenized prompt: template, tokenizer, image preprocessing and pad expansion."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..errors import UserError
from .chat import render, split_messages
from .preprocess import ImageProcessorConfig, preprocess_images


@dataclass
class Prompt:
    """A tokenized prompt with its images already preprocessed."""

    ids: list[int]
    pixel_values: np.ndarray | None
    grids: list[tuple[int, int, int]]


def build_prompt(tokenizer: Tokenizer, chat_template: str, image_config: ImageProcessorConfig, image_token_id: int,
                 messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> Prompt:  # fmt: skip
    """Render, tokenize and expand each image pad to its token count; preprocess the images.

    Shared by inference and by the shapes training script, so both see byte-identical prompts.
    """
    tmpl_messages, images = split_messages(messages)
    text = render(chat_template, tmpl_messages, add_generation_prompt)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    n_pads = sum(1 for i in ids if i == image_token_id)
    if n_pads != len(images):
        raise UserError(f"chat template produced {n_pads} image markers for {len(images)} images")
    if not images:
        return Prompt(ids, None, [])
    pixel_values, grids = preprocess_images(images, image_config)
    merge2 = image_config.merge_size**2
    counts = iter(t * h * w // merge2 for t, h, w in grids)
    expanded: list[int] = []
    for i in ids:
        expanded.extend([image_token_id] * next(counts) if i == image_token_id else [i])
    return Prompt(expanded, pixel_values, grids)


def load_tokenizer(directory: Path) -> Tokenizer:
    """The bundle's ``tokenizer.json``, or a one-line error naming what is wrong with it.

    Parsing Qwen's 151k-token vocabulary takes ~0.5-1 s; bundles of one model family carry the same
    file, so a process shares one parsed tokenizer per file content (it is never mutated).
    """
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{directory}: bundle is incomplete, tokenizer.json is missing")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest not in _TOKENIZERS:
        try:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises plain Exceptions with a parser message
            raise UserError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0][:160]})") from None
        while len(_TOKENIZERS) >= 4:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[digest] = tokenizer
    return _TOKENIZERS[digest]


_TOKENIZERS: dict[str, Tokenizer] = {}  # sha256 of tokenizer.json -> parsed tokenizer, oldest first
