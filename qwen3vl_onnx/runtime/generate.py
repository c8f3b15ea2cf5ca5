"""Token generation over a bundle, in three layers as mlx-lm has them.

- ``generate_step``: a generator of (token id, logits) for one sequence: prefill, then one decode
  step each time the consumer asks for the next token (stopping costs nothing).
- ``batch_generate_step``: the same for B sequences at once, one decoder call per step for all
  rows, each row at its own length (right-padded prompts, per-row ``seqlens_k``).
- ``stream_generate``: images encoded, tokens detokenised into text deltas, timings, a ``Result``.
``Pipeline`` (pipeline.py) puts a chat template and a tokenizer in front of these.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .cache import KVCache
from .model import BundleModel
from .positions import rope_index
from .prompt import Prompt
from .sampling import Sampler
from .vision_cache import VisionCache


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    timings: dict[str, float | None] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens reused from the cache, not prefilled
    reasoning: str | None = None  # Thinking checkpoints: what came before </think> (None: not a Thinking template)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "reasoning": self.reasoning,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "timings": self.timings,
        }


def generate_step(model: BundleModel, ids: Sequence[int], cache: KVCache, sampler: Sampler, max_tokens: int,
                  image_embeds: np.ndarray | None = None, deepstack: np.ndarray | None = None,
                  grids: Sequence[tuple[int, int, int]] = ()) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """Prefill ``ids`` after what ``cache`` (batch 1) holds, then yield up to ``max_tokens`` (token,
    logits it was drawn from); the next decode step runs only when the next token is asked for."""
    logits = model.prefill(ids, image_embeds, deepstack, grids, cache)[0, -1]
    for n in range(max_tokens):
        token = int(sampler(logits[None])[0])
        yield token, logits
        if n + 1 < max_tokens:
            logits = model.step([token], cache)[0]


def batch_generate_step(model: BundleModel, prompts: Sequence[Sequence[int]], cache: KVCache, sampler: Sampler,
                        max_tokens: int) -> Iterator[np.ndarray]:  # fmt: skip
    """Text prompts of different lengths decoded together: one right-padded prefill call into an
    empty cache of ``len(prompts)`` rows, then one decoder call per step for every row. Yields the
    (B,) tokens of each step; a caller stops rows it no longer needs by ignoring them."""
    if cache.batch != len(prompts) or cache.length:
        raise ValueError("batch_generate_step needs an empty cache with one row per prompt")
    cfg = model.config
    lengths = np.array([len(p) for p in prompts], np.int64)
    width = int(lengths.max())
    ids = np.zeros((len(prompts), width), np.int64)  # padding is masked by seqlens_k: its id does not matter
    pos = np.zeros((3, len(prompts), width), np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
        pos[:, b, : len(p)], cache.rope_deltas[b] = rope_index(p, cfg.image_token_id, cfg.video_token_id)
    embeds = model.embed(ids.ravel()).reshape(*ids.shape, -1)
    logits = model.forward(embeds, pos, cache, logits_to_keep=width, new_lengths=lengths)
    last = logits[np.arange(len(prompts)), lengths - 1]
    for n in range(max_tokens):
        tokens = sampler(last)
        yield tokens
        if n + 1 < max_tokens:
            last = model.step(tokens, cache)


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


class _Parts:
    """Detokenises reasoning (up to ``think_end``) and answer separately; after ``</think>`` the
    answer's leading newlines (the template's separator) are not part of it."""

    def __init__(self, tokenizer: Tokenizer, think_end: int | None):
        self.think_end = think_end
        self.reasoning = Detokenizer(tokenizer)
        self.text = Detokenizer(tokenizer) if think_end is None else _AnswerText(tokenizer)
        self.part = "text" if think_end is None else "reasoning"
        self.ids: list[int] = []

    def push(self, token: int) -> Delta:
        self.ids.append(token)
        if self.part == "reasoning":
            if token == self.think_end:
                self.part = "text"
                return Delta(self.reasoning.flush(), "reasoning")
            return Delta(self.reasoning.push(token), "reasoning")
        return Delta(self.text.push(token), "text")

    def flush(self) -> Delta:
        if self.part == "reasoning":
            return Delta(self.reasoning.flush(), "reasoning")
        return Delta(self.text.flush(), "text")


class _AnswerText(Detokenizer):
    """A Detokenizer whose text starts at the first character that is not a newline."""

    def push(self, token: int) -> str:
        return self._trim(super().push(token))

    def flush(self) -> str:
        return self._trim(super().flush())

    def _trim(self, piece: str) -> str:
        if self.started:
            return piece
        piece = piece.lstrip("\n")
        self.started = bool(piece)
        return piece

    started = False


class Delta(str):
    """A piece of streamed text that knows which part of the answer it belongs to: "text", or
    "reasoning" for what a Thinking checkpoint writes before ``</think>``. It is a ``str``, so code
    that only prints deltas needs to know nothing of parts."""

    part: str

    def __new__(cls, text: str, part: str = "text") -> Delta:
        d = super().__new__(cls, text)
        d.part = part
        return d


class Stream:
    """Iterator of text deltas (:class:`Delta`); ``result`` (a :class:`Result`) is set once it is
    exhausted. ``close()`` stops the generation early."""

    def __init__(self, events: Iterator[str | Result]):
        self._events = events
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        for ev in self._events:
            if isinstance(ev, Result):
                self.result = ev
            elif ev:
                yield ev

    def close(self) -> None:
        """Stop generating (no result is made); what consumed the stream so far stands."""
        close = getattr(self._events, "close", None)
        if close is not None:
            close()

    def finish(self) -> Result:
        """Run to the end (if not yet) and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


@dataclass
class PrefillInput:
    """What a request prefills after the tokens its cache already holds: token ids, and the visual
    features and grids of the images (or videos) whose pads are among them."""

    ids: list[int]
    image_embeds: np.ndarray | None = None
    deepstack: np.ndarray | None = None
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    reused: int = 0  # prompt tokens taken from the cache instead (reported as cached tokens)


def image_slices(prompt: Prompt) -> list[np.ndarray]:
    """Each image's (or video's) rows of ``prompt.pixel_values``, in prompt order."""
    if prompt.pixel_values is None:
        return []
    sizes = np.cumsum([0] + [t * h * w for t, h, w in prompt.grids])
    return [prompt.pixel_values[sizes[i] : sizes[i + 1]] for i in range(len(prompt.grids))]


def prefill_input(model: BundleModel, prompt: Prompt, start: int = 0, vision: VisionCache | None = None) -> PrefillInput:
    """``prompt.ids[start:]`` with the features of the images whose pads it holds (``start`` must
    not cut an image's pads), encoded in one vision call or taken from ``vision``."""
    cfg = model.config
    pads = {cfg.image_token_id, cfg.video_token_id}
    merge2 = cfg.vision.spatial_merge_size**2
    before = sum(1 for t in prompt.ids[:start] if t in pads)
    first, seen = 0, 0
    while first < len(prompt.grids) and seen < before:
        seen += int(np.prod(prompt.grids[first])) // merge2
        first += 1
    if seen != before:
        raise ValueError(f"prefill start {start} cuts an image's pad tokens")
    grids = list(prompt.grids[first:])
    if not grids:
        return PrefillInput(list(prompt.ids[start:]), reused=start)
    pixels = image_slices(prompt)[first:]
    if vision is not None:
        emb, ds = vision.encode(model, pixels, grids)
    else:
        emb, ds = model.encode_images(np.concatenate(pixels), grids)
    return PrefillInput(list(prompt.ids[start:]), emb, ds, grids, start)


def stream_generate(model: BundleModel, tokenizer: Tokenizer, request: PrefillInput, cache: KVCache, sampler: Sampler,
                    max_new_tokens: int, eos_ids: set[int], timings: dict[str, float] | None = None,
                    t0: float | None = None, think_end: int | None = None) -> Iterator[str | Result]:  # fmt: skip
    """Prefill ``request`` after what ``cache`` holds, generate, and yield :class:`Delta` text then
    a :class:`Result` with timings (``t0``: when the request started, for time to first token;
    ``timings``: what the caller measured before, such as preprocessing and vision). An empty
    ``eos_ids`` generates ``max_new_tokens`` whatever comes. ``think_end`` (the ``</think>`` id of
    a Thinking checkpoint, whose prompt opened ``<think>``) splits reasoning from the answer."""
    t_start = time.perf_counter()
    t0 = t_start if t0 is None else t0
    steps = generate_step(model, request.ids, cache, sampler, max_new_tokens, request.image_embeds, request.deepstack,
                          request.grids)  # fmt: skip
    parts = _Parts(tokenizer, think_end)
    t_first = t_start
    finish = "length"
    for k, (token, _) in enumerate(steps):
        if k == 0:
            t_first = time.perf_counter()
        if token in eos_ids:
            finish = "stop"
            break
        yield parts.push(token)
    yield parts.flush()
    t_end = time.perf_counter()
    k, n = len(parts.ids), len(request.ids)
    decode_s = t_end - t_first
    out: dict[str, float | None] = {"preprocess_s": 0.0, "vision_s": 0.0, **(timings or {})}
    out.update({
        "prefill_s": t_first - t_start,
        "ttft_s": t_first - t0,
        "decode_s": decode_s,
        "total_s": t_end - t0,
        "prefill_tok_per_s": n / max(t_first - t_start, 1e-9),
        # None when fewer than two tokens came: one token is the prefill's, there is no decode rate
        "decode_tok_per_s": (k - 1) / decode_s if k > 1 and decode_s > 0 else None,
    })  # fmt: skip
    rounded = {a: b if b is None else round(b, 4) for a, b in out.items()}
    answer = parts.text.text() if think_end is None else parts.text.text().lstrip("\n")
    yield Result(answer, parts.ids, request.reused + n, k, finish, rounded, request.reused,
                 None if think_end is None else parts.reasoning.text())  # fmt: skip


def stats_line(res: Result) -> str:
    """The bracketed figures after an answer; decode speed only when there was a decode step."""
    t = res.timings
    decode = "" if t["decode_tok_per_s"] is None else f", decode {t['decode_tok_per_s']:.1f} tok/s"
    return (f"[{res.prompt_tokens} prompt + {res.completion_tokens} new tokens; first token {t['ttft_s']:.2f}s, "
            f"vision {t['vision_s']:.2f}s, prefill {t['prefill_tok_per_s']:.1f} tok/s{decode}]")  # fmt: skip


def __getattr__(name: str) -> Any:
    """``from qwen3vl_onnx.runtime.generate import Pipeline`` keeps working (it lives in pipeline.py)."""
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
