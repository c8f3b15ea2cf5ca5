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

from ..config import Qwen3VLConfig
from .cache import KVCache
from .model import BundleModel
from .positions import rope_index
from .prompt import Prompt
from .sampling import LogitsProcessor, Sampler, TokenLogprob, token_logprob
from .text_stream import AnswerParts
from .tool_calls import AnswerCalls, ToolCall
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
    logprobs: list[TokenLogprob] | None = None  # per answer token, when asked for
    tool_calls: list[ToolCall] | None = None  # when tools were offered: the calls made (text is what is outside them)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "reasoning": self.reasoning,
            "tool_calls": None if self.tool_calls is None else [c.to_dict() for c in self.tool_calls],
            "logprobs": None
            if self.logprobs is None
            else [{"token": lp.token, "logprob": lp.logprob, "top": [list(t) for t in lp.top]} for lp in self.logprobs],
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "timings": self.timings,
        }


def generate_step(model: BundleModel, ids: Sequence[int], cache: KVCache, sampler: Sampler, max_tokens: int,
                  image_embeds: np.ndarray | None = None, deepstack: np.ndarray | None = None,
                  grids: Sequence[tuple[int, int, int]] = (), processor: LogitsProcessor | None = None,
                  context: Sequence[int] | None = None,
                  video_grids: Sequence[tuple[int, int, int]] = ()) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """Prefill ``ids`` after what ``cache`` (batch 1) holds, then yield up to ``max_tokens`` (token,
    logits it was drawn from, after ``processor``, which sees ``context``, the whole prompt, default
    ``ids``, and the tokens so far); the next decode step runs only when the next token is asked for."""
    context = ids if context is None else context
    generated: list[int] = []
    logits = model.prefill(ids, image_embeds, deepstack, grids, cache, video_grids=video_grids)[0, -1]
    for n in range(max_tokens):
        if processor is not None:
            logits = processor(logits, context, generated)
        token = int(sampler(logits[None])[0])
        generated.append(token)
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
    features and grids of the images and videos whose pads are among them (``videos[i]``: grid i is
    a video's)."""

    ids: list[int]
    image_embeds: np.ndarray | None = None
    deepstack: np.ndarray | None = None
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    videos: list[bool] = field(default_factory=list)
    reused: int = 0  # prompt tokens taken from the cache instead (reported as cached tokens)
    prompt: list[int] = field(default_factory=list)  # the whole prompt, for penalties that count it

    @property
    def image_grids(self) -> list[tuple[int, int, int]]:
        return [g for g, v in zip(self.grids, self.videos or [False] * len(self.grids), strict=True) if not v]

    @property
    def video_grids(self) -> list[tuple[int, int, int]]:
        return [g for g, v in zip(self.grids, self.videos or [False] * len(self.grids), strict=True) if v]


@dataclass(frozen=True)
class Decoding:
    """How one request turns logits into an answer, built from its ``GenerationParams``."""

    sampler: Sampler
    max_new_tokens: int
    eos_ids: frozenset[int]  # end-of-turn and stop token ids (empty: generate max_new_tokens whatever comes)
    processor: LogitsProcessor | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    think_end: int | None = None  # Thinking checkpoints: the </think> id that ends the reasoning
    calls: bool = False  # tools were offered: calls are read out of the answer


def image_slices(prompt: Prompt) -> list[np.ndarray]:
    """Each image's (or video's) rows of ``prompt.pixel_values``, in prompt order."""
    if prompt.pixel_values is None:
        return []
    sizes = np.cumsum([0] + [t * h * w for t, h, w in prompt.grids])
    return [prompt.pixel_values[sizes[i] : sizes[i + 1]] for i in range(len(prompt.grids))]


def images_before(cfg: Qwen3VLConfig, prompt: Prompt, end: int) -> int:
    """How many of the prompt's images (or videos) have their pads in ``ids[:end]``; ``end`` must
    not fall inside an image's pads."""
    pads = {cfg.image_token_id, cfg.video_token_id}
    merge2 = cfg.vision.spatial_merge_size**2
    before = sum(1 for t in prompt.ids[:end] if t in pads)
    n, seen = 0, 0
    while n < len(prompt.grids) and seen < before:
        seen += int(np.prod(prompt.grids[n])) // merge2
        n += 1
    if seen != before:
        raise ValueError(f"position {end} cuts an image's pad tokens")
    return n


def prefix_rope_delta(cfg: Qwen3VLConfig, prompt: Prompt, keep: int) -> int:
    """The MRoPE offset of ``prompt.ids[:keep]`` (a prefix kept in a cache; it must not cut a
    picture), from its tokens and the grids of the pictures in it."""
    n = images_before(cfg, prompt, keep)
    head = Prompt(prompt.ids[:keep], None, prompt.grids[:n], prompt.videos[:n])
    return rope_index(head.ids, cfg.image_token_id, cfg.video_token_id, head.image_grids, head.video_grids,
                      cfg.vision.spatial_merge_size)[1]  # fmt: skip


def prefill_input(model: BundleModel, prompt: Prompt, start: int = 0, vision: VisionCache | None = None) -> PrefillInput:
    """``prompt.ids[start:]`` with the features of the images whose pads it holds (``start`` must
    not cut an image's pads), encoded in one vision call or taken from ``vision``."""
    first = images_before(model.config, prompt, start)
    grids = list(prompt.grids[first:])
    if not grids:
        return PrefillInput(list(prompt.ids[start:]), reused=start, prompt=list(prompt.ids))
    pixels = image_slices(prompt)[first:]
    if vision is not None:
        emb, ds = vision.encode(model, pixels, grids)
    else:
        emb, ds = model.encode_images(np.concatenate(pixels), grids)
    videos = list(prompt.videos[first:])
    return PrefillInput(list(prompt.ids[start:]), emb, ds, grids, videos, start, list(prompt.ids))


def stream_generate(model: BundleModel, tokenizer: Tokenizer, request: PrefillInput, cache: KVCache, decoding: Decoding,
                    timings: dict[str, float] | None = None, t0: float | None = None) -> Iterator[str | Result]:  # fmt: skip
    """Prefill ``request`` after what ``cache`` holds, generate, and yield :class:`Delta` text then
    a :class:`Result` with timings (``t0``: when the request started, for time to first token;
    ``timings``: what the caller measured before, such as preprocessing and vision)."""
    t_start = time.perf_counter()
    t0 = t_start if t0 is None else t0
    d = decoding
    steps = generate_step(model, request.ids, cache, d.sampler, d.max_new_tokens, request.image_embeds, request.deepstack,
                          request.image_grids, d.processor, request.prompt or request.ids, request.video_grids)  # fmt: skip
    parts = AnswerParts(tokenizer, d.think_end, d.stop)
    calls = AnswerCalls() if d.calls else None
    logprobs: list[TokenLogprob] = []
    t_first = t_start
    finish = "length"
    for k, (token, logits) in enumerate(steps):
        if k == 0:
            t_first = time.perf_counter()
        if token in d.eos_ids:
            finish = "stop"
            break
        if d.logprobs is not None:
            logprobs.append(token_logprob(logits, token, d.logprobs))
        delta = parts.push(token)
        yield from (x for x in calls.push(delta) if isinstance(x, str)) if calls is not None else (delta,)
        if parts.stopped:
            finish = "stop"
            break
    tail = parts.flush()
    yield from (x for x in [*calls.push(tail), *calls.flush()] if isinstance(x, str)) if calls is not None else (tail,)
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
    text, reasoning = parts.answer_text(), None if d.think_end is None else parts.reasoning_text()
    if calls is not None:
        text, reasoning = calls.text(), None if reasoning is None else calls.text("reasoning")
        finish = "tool_calls" if calls.calls and finish == "stop" else finish
    yield Result(text, parts.ids, request.reused + n, k, finish, rounded, request.reused, reasoning,
                 logprobs if d.logprobs is not None else None, calls.calls if calls is not None else None)  # fmt: skip


def stats_line(res: Result, reused: bool = False) -> str:
    """The bracketed figures after an answer (``reused``: say how many prompt tokens came from the
    cache, as a conversation does); decode speed only when there was a decode step."""
    t = res.timings
    cached = f" ({res.cached_tokens} reused)" if reused else ""
    decode = "" if t["decode_tok_per_s"] is None else f", decode {t['decode_tok_per_s']:.1f} tok/s"
    return (f"[{res.prompt_tokens} prompt tokens{cached} + {res.completion_tokens} new tokens; first token "
            f"{t['ttft_s']:.2f}s, vision {t['vision_s']:.2f}s, prefill {t['prefill_tok_per_s']:.1f} tok/s{decode}]")  # fmt: skip
