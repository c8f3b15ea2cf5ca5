"""The user-facing pipeline: messages with images in, text out (streamed or whole).

``Pipeline.from_bundle(dir).generate(messages, ...)`` renders the checkpoint's chat template,
preprocesses images, expands each image pad to its token count, computes MRoPE positions, encodes
all images in one vision call, prefills, then decodes with the KV cache until an end-of-turn id.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..errors import UserError
from .chat import load_chat_template, render, split_messages
from .model import BundleModel
from .preprocess import ImageProcessorConfig, preprocess_images
from .sampling import check_sampling, sample


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    timings: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "timings": self.timings,
        }


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


class Detokenizer:
    """Turns a growing list of ids into text deltas, holding back split multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # ids before this have been emitted
        self.emitted = 0  # characters handed out so far

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted += len(after) - len(before)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever was held back (an incomplete character at the very end)."""
        rest = self.text()[self.emitted :]
        self.emitted += len(rest)
        return rest

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


class Stream:
    """Iterator of text deltas; ``result`` is set once it is exhausted."""

    def __init__(self, events: Iterator[str | Result]):
        self._events = events
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        for ev in self._events:
            if isinstance(ev, Result):
                self.result = ev
            elif ev:
                yield ev


class Pipeline:
    def __init__(self, model: BundleModel, context_length: int | None = None):
        self.model = model
        self.config = model.config
        path = model.path
        self.tokenizer = load_tokenizer(path)
        self.chat_template = load_chat_template(path)
        self.image_config = ImageProcessorConfig.from_file(path / "preprocessor_config.json")
        gen = path / "generation_config.json"
        self.generation_config = json.loads(gen.read_text()) if gen.is_file() else {}
        eos = self.generation_config.get("eos_token_id", self.tokenizer.token_to_id("<|im_end|>"))
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.context_length = context_length or self.config.text.max_position_embeddings

    @classmethod
    def from_bundle(cls, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                    context_length: int | None = None, prefill_graph: bool = True) -> Pipeline:  # fmt: skip
        return cls(BundleModel(path, providers, threads, prefill_graph), context_length)

    # ---- prompt ----

    def prepare(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> Prompt:
        return build_prompt(self.tokenizer, self.chat_template, self.image_config, self.config.image_token_id, messages,
                            add_generation_prompt)  # fmt: skip

    # ---- generation ----

    def generate(self, messages: list[dict[str, Any]], max_new_tokens: int = 256, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None, stream: bool = False,
                 ignore_eos: bool = False) -> Result | Stream:  # fmt: skip
        """Answer ``messages``; returns a :class:`Result`, or a :class:`Stream` of text deltas."""
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed)
        g = self.generation_config
        if temperature is None:
            temperature = float(g.get("temperature", 1.0)) if g.get("do_sample") else 0.0
        top_p = float(g.get("top_p", 1.0)) if top_p is None else top_p
        top_k = int(g.get("top_k", 0)) if top_k is None else top_k
        events = self._run(messages, max_new_tokens, temperature, top_p, top_k, seed, ignore_eos)
        if stream:
            return Stream(events)
        for ev in events:
            if isinstance(ev, Result):
                return ev
        raise RuntimeError("generation ended without a result")

    def _run(self, messages, max_new_tokens, temperature, top_p, top_k, seed, ignore_eos) -> Iterator[str | Result]:
        t0 = time.perf_counter()
        prompt = self.prepare(messages)
        n = len(prompt.ids)
        if n >= self.context_length:
            raise UserError(f"prompt is {n} tokens, the context holds {self.context_length}")
        max_new_tokens = min(max_new_tokens, self.context_length - n)
        t_pre = time.perf_counter()
        m = self.model
        image_embeds = deepstack = None
        if prompt.pixel_values is not None:
            image_embeds, deepstack = m.encode_images(prompt.pixel_values, prompt.grids)
        t_vis = time.perf_counter()
        cache = m.new_cache(capacity=n + max_new_tokens)
        logits = m.prefill(prompt.ids, image_embeds, deepstack, prompt.grids, cache)[0, -1]
        rng = np.random.default_rng(seed)
        detok = Detokenizer(self.tokenizer)
        t_first = t_prefill = time.perf_counter()
        finish = "length"
        for step in range(max_new_tokens):
            tok = sample(logits, rng, temperature, top_k, top_p)
            if step == 0:
                t_first = time.perf_counter()
            if tok in self.eos_ids and not ignore_eos:
                finish = "stop"
                break
            yield detok.push(tok)
            if step == max_new_tokens - 1:
                break
            logits = m.step(tok, cache)
        yield detok.flush()
        t_end = time.perf_counter()
        k = len(detok.ids)
        decode_s = t_end - t_first
        timings = {
            "preprocess_s": t_pre - t0,
            "vision_s": t_vis - t_pre,
            "prefill_s": t_prefill - t_vis,
            "ttft_s": t_first - t0,
            "decode_s": decode_s,
            "total_s": t_end - t0,
            "prefill_tok_per_s": n / max(t_prefill - t_vis, 1e-9),
            # None when fewer than two tokens came: one token is the prefill's, there is no decode rate
            "decode_tok_per_s": (k - 1) / decode_s if k > 1 and decode_s > 0 else None,
        }
        yield Result(
            detok.text(), list(detok.ids), n, k, finish, {a: b if b is None else round(b, 4) for a, b in timings.items()}
        )


def stats_line(res: Result) -> str:
    """The bracketed figures after an answer; decode speed only when there was a decode step."""
    t = res.timings
    decode = "" if t["decode_tok_per_s"] is None else f", decode {t['decode_tok_per_s']:.1f} tok/s"
    return (f"[{res.prompt_tokens} prompt + {res.completion_tokens} new tokens; first token {t['ttft_s']:.2f}s, "
            f"vision {t['vision_s']:.2f}s, prefill {t['prefill_tok_per_s']:.1f} tok/s{decode}]")  # fmt: skip
