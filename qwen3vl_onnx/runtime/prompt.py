"""From chat messages to a tokenized prompt: template, tokenizer, image and video preprocessing, pad expansion."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..config import Qwen3VLConfig
from ..errors import UserError
from .chat import Visual, render, split_messages
from .preprocess import ImageProcessorConfig, preprocess_image
from .video import VideoProcessorConfig, VideoRequest, preprocess_video


@dataclass(frozen=True)
class Processors:
    """How a checkpoint turns pictures into tokens: its image and video processor settings (no video
    config: the checkpoint takes no video) and its vision token ids."""

    image: ImageProcessorConfig
    video: VideoProcessorConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @classmethod
    def from_bundle(cls, directory: Path, cfg: Qwen3VLConfig) -> Processors:
        return cls(ImageProcessorConfig.from_file(directory / "preprocessor_config.json"),
                   VideoProcessorConfig.from_file(directory / "video_preprocessor_config.json"),
                   cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)  # fmt: skip


@dataclass
class Prompt:
    """A tokenized prompt with its images and videos already preprocessed, in prompt order:
    ``grids[i]`` is the i-th picture's (t, h, w) and ``videos[i]`` says whether it is a video."""

    ids: list[int]
    pixel_values: np.ndarray | None
    grids: list[tuple[int, int, int]]
    videos: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.videos:
            self.videos = [False] * len(self.grids)

    @property
    def image_grids(self) -> list[tuple[int, int, int]]:
        return [g for g, v in zip(self.grids, self.videos, strict=True) if not v]

    @property
    def video_grids(self) -> list[tuple[int, int, int]]:
        return [g for g, v in zip(self.grids, self.videos, strict=True) if v]


def _preprocess(visual: Visual, proc: Processors) -> tuple[np.ndarray, tuple[int, int, int], list[float] | None]:
    if isinstance(visual, VideoRequest):
        if proc.video is None:
            raise UserError("this bundle's checkpoint has no video_preprocessor_config.json: it does not take video")
        v = preprocess_video(visual, proc.video)
        return v.pixel_values, v.grid, v.timestamps
    pixels, grid = preprocess_image(visual, proc.image)
    return pixels, grid, None


def build_prompt(tokenizer: Tokenizer, chat_template: str, proc: Processors, messages: list[dict[str, Any]],
                 add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None) -> Prompt:  # fmt: skip
    """Render, tokenize, preprocess the pictures and expand each pad: an image's to its token count,
    a video's to ``<{t:.1f} seconds><|vision_start|>pads<|vision_end|>`` per temporal patch. Those
    per-frame markers replace the template's own pair around the video pad, as the processor
    Qwen3-VL was released with (and transformers >= 5.25, vLLM, OpenVINO GenAI) renders it: the
    model was trained on that form.

    Shared by inference and by the shapes training script, so both see byte-identical prompts.
    """
    tmpl_messages, visuals = split_messages(messages)
    if tools:
        text = render(chat_template, tmpl_messages, add_generation_prompt, tools=[dict(t) for t in tools])
        name = next((t.get("function", {}).get("name") for t in tools if isinstance(t, Mapping)), None)
        if isinstance(name, str) and name not in text:
            raise UserError("this checkpoint's chat template does not render tools (it has no tools block)")
    else:
        text = render(chat_template, tmpl_messages, add_generation_prompt)
    ids = _unwrap_videos(tokenizer.encode(text, add_special_tokens=False).ids, proc)
    kinds = [isinstance(v, VideoRequest) for v in visuals]
    for token, is_video, what in ((proc.image_token_id, False, "image"), (proc.video_token_id, True, "video")):
        n_pads, n = sum(1 for i in ids if i == token), kinds.count(is_video)
        if n_pads != n:
            raise UserError(f"chat template produced {n_pads} {what} markers for {n} {what}s")
    if not visuals:
        return Prompt(ids, None, [])
    done = [_preprocess(v, proc) for v in visuals]
    merge2 = proc.image.merge_size**2
    items = iter(done)
    expanded: list[int] = []
    for i in ids:
        if i not in (proc.image_token_id, proc.video_token_id):
            expanded.append(i)
            continue
        _, (t, h, w), stamps = next(items)
        if stamps is None:
            expanded.extend([i] * (t * h * w // merge2))
            continue
        for s in stamps:  # one block per temporal patch; the timestamp text sits between special tokens
            expanded.extend(tokenizer.encode(f"<{s:.1f} seconds>", add_special_tokens=False).ids)
            expanded.extend([proc.vision_start_token_id, *[i] * (h * w // merge2), proc.vision_end_token_id])
    return Prompt(expanded, np.concatenate([d[0] for d in done]), [d[1] for d in done], kinds)


def _unwrap_videos(ids: list[int], proc: Processors) -> list[int]:
    """``ids`` with each ``<|vision_start|><|video_pad|><|vision_end|>`` of the template reduced to
    the pad (the frames bring their own markers); a video pad written without that pair stays as it is."""
    out: list[int] = []
    n = len(ids)
    k = 0
    while k < n:
        if (ids[k] == proc.vision_start_token_id and k + 2 < n and ids[k + 1] == proc.video_token_id
                and ids[k + 2] == proc.vision_end_token_id):  # fmt: skip
            out.append(proc.video_token_id)
            k += 3
            continue
        out.append(ids[k])
        k += 1
    return out


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
