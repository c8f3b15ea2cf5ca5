"""Continuous batching over one preallocated KV cache: requests hold slots, one decoder call per step.

Two threads. The *prep* thread renders each request, preprocesses its pictures and runs the vision
tower (features come from a content-keyed cache when a picture was seen before), so a picture being
encoded never stops running streams. The *engine* thread owns the decoder and the cache: it gives a
prepared request a free slot (the one whose cached tokens share the longest prefix with it, so a
follow-up request prefills only its new suffix), prefills it in chunks sized to take about
``prefill_slice_ms`` while others decode, and advances every decoding slot with one batched call per step. Rows that are
not decoding take part in that call and have their length restored after it: whatever the call
wrote past their end is overwritten later. A request that finishes or whose client leaves frees its
slot at once; the slot keeps its tokens for the next request that extends them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from ..runtime.conversation import reusable_prefix
from ..runtime.generate import Decoding, image_slices, images_before, prefix_rope_delta
from ..runtime.pipeline import Pipeline
from ..runtime.prompt import Prompt
from ..runtime.sampling import GenerationParams, TokenLogprob, token_logprob
from ..runtime.text_stream import AnswerParts, Delta
from ..runtime.vision_cache import VisionCache
from .memory import available_memory
from .settings import ServerSettings

log = logging.getLogger("qwen3vl_onnx.server")


@dataclass(frozen=True)
class Accepted:
    prompt_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


@dataclass(frozen=True)
class Token:
    delta: Delta
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


Event = Accepted | Failed | Token | Finished


@dataclass
class Job:
    """One request on its way through the engine; ``sink`` receives its events from engine threads."""

    messages: list[dict[str, Any]]
    params: GenerationParams
    sink: Callable[[Event], None]
    explicit_max: bool = False  # the request set max_tokens: refuse it when prompt + max_tokens exceed the context
    prompt_ids: list[int] | None = None  # a raw prompt (/v1/completions): these tokens, no chat template
    leader: Job | None = None  # choice 0 of the same request: this one starts from its prefilled prompt
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt: Prompt | None = None
    decoding: Decoding | None = None
    keys: list[str] = field(default_factory=list)  # content keys of its pictures, in prompt order
    features: tuple[np.ndarray, np.ndarray] | None = None  # all its pictures' (embeddings, DeepStack)
    slot: int = -1
    steps: Iterator[np.ndarray | None] | None = None  # the chunked prefill, while it runs
    parts: AnswerParts | None = None
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # the sampled token the next decode step feeds
    cached: int = 0


@dataclass
class Slot:
    index: int
    ids: list[int] = field(default_factory=list)  # tokens whose keys and values the row holds
    keys: list[str] = field(default_factory=list)
    job: Job | None = None


class QueueFull(Exception):
    """More requests are waiting than the server queues."""


class Engine:
    def __init__(self, pipe: Pipeline, settings: ServerSettings, metrics: Any = None):
        self.pipe, self.settings, self.metrics = pipe, settings, metrics
        self.model = pipe.model
        pipe.context_length = settings.ctx_size
        capacity = settings.ctx_size + 1  # one position of headroom: a step writes one past every row's end, idle rows included
        need, free = self.model.cache_bytes(settings.parallel, capacity), available_memory()
        if free is not None and need > free:  # refused by name, not killed for memory while the cache is mapped
            raise UserError(f"the KV cache for --parallel {settings.parallel} x --ctx-size {settings.ctx_size} needs "
                            f"{need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB of memory is available: lower --parallel or "
                            "--ctx-size")  # fmt: skip
        self.cache = self.model.new_cache(batch=settings.parallel, capacity=capacity)
        self.cache.ensure(capacity)
        self._warm()
        pipe.grammars()  # the tokenizer's grammar view (~1-2 s): built at load, not by the first request that needs it
        self.slots = [Slot(i) for i in range(settings.parallel)]
        self.rows = [self.cache.row(i) for i in range(settings.parallel)]
        self._views: dict[tuple[int, int], Any] = {}  # (first, stop) -> a view of those rows, bound once
        self.vision = VisionCache(64)
        self._token_s = settings.prefill_slice_ms / 1000 / 16  # prompt seconds per token, measured as chunks run
        self._sliced = False  # the chunk being run was cut to the time budget
        self.incoming: queue.Queue[Job] = queue.Queue()
        self.ready: collections.deque[Job] = collections.deque()
        self.wake = threading.Condition()
        cfg = self.model.config
        self.pads = {cfg.image_token_id, cfg.video_token_id}
        for target, name in ((self._prep_loop, "prep"), (self._engine_loop, "engine")):
            threading.Thread(target=target, name=f"qwen3vl-{name}", daemon=True).start()

    def _warm(self) -> None:
        """Map the whole KV buffer and run one decode step at every batch width before the first
        request. Why: a fresh row's first call maps its whole capacity (1.7 s per 4096-token 4B row
        on this project's VMs) and a width's first call costs about twice a later one; requests
        would otherwise pay both as stalls of every running stream."""
        self.cache.prefault()
        for width in range(1, self.settings.parallel + 1):
            view = self.cache.rows(0, width)
            self.model.step(np.zeros(width, np.int64), view)
            view.reset()

    # ---- requests in ----

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it when ``queue_size`` requests already wait for a slot (those
        being prepared while slots are free do not count: a burst as large as the slots is never refused)."""
        with self.wake:
            free = sum(1 for s in self.slots if s.job is None)
            if self._waiting() - free >= self.settings.queue_size:
                raise QueueFull(f"{self.settings.queue_size} requests are already waiting; try again later")
            self.incoming.put_nowait(job)
            self._gauge("queue_depth", self._waiting())

    def _waiting(self) -> int:
        """Requests waiting for a slot whose clients are still there (one who left holds no place)."""
        with self.incoming.mutex:
            incoming = sum(1 for j in self.incoming.queue if not j.cancelled.is_set())
        return incoming + sum(1 for j in self.ready if not j.cancelled.is_set())

    def _prep_loop(self) -> None:
        while True:
            job = self.incoming.get()
            if job.cancelled.is_set():
                continue
            try:
                self._prepare(job)
            except UserError as e:
                job.sink(Failed(400, str(e)))
                continue
            except Exception as e:  # a bug must fail the request, never the server
                log.exception("preparing a request failed")
                job.sink(Failed(500, f"internal error while preparing the request ({type(e).__name__})"))
                continue
            job.sink(Accepted(len(job.prompt.ids)))  # type: ignore[union-attr]
            with self.wake:
                self.ready.append(job)
                self.wake.notify()

    def _prepare(self, job: Job) -> None:
        pipe, ctx = self.pipe, self.settings.ctx_size
        raw = job.prompt_ids is not None
        if job.prompt_ids is not None:
            prompt = Prompt(list(job.prompt_ids), None, [])
        else:
            prompt = pipe.prepare(job.messages, tools=job.params.tools)
        if len(prompt.ids) >= ctx:
            raise UserError(f"prompt is {len(prompt.ids)} tokens, the context (--ctx-size) holds {ctx}")
        if job.explicit_max and len(prompt.ids) + job.params.max_new_tokens > ctx:
            raise UserError(f"prompt ({len(prompt.ids)} tokens) + max_tokens ({job.params.max_new_tokens}) exceed the "
                            f"context of {ctx} tokens (--ctx-size)")  # fmt: skip
        decoding = pipe.decoding(job.params, len(prompt.ids))
        job.prompt, job.decoding = prompt, dataclasses.replace(decoding, think_end=None) if raw else decoding  # raw: no reasoning
        pixels = image_slices(prompt)
        job.keys = [VisionCache.key(p, g) for p, g in zip(pixels, prompt.grids, strict=True)]
        if prompt.grids:
            t = time.perf_counter()
            job.features = self.vision.encode(self.model, pixels, prompt.grids)
            self._observe("vision_seconds", time.perf_counter() - t)

    # ---- the engine thread ----

    def _engine_loop(self) -> None:
        while True:
            with self.wake:
                while not self.ready and not any(s.job for s in self.slots):
                    self.wake.wait()
                self._admit()
            try:
                self._tick()
            except Exception as e:  # keep serving: fail the running requests, start their slots afresh
                log.exception("engine step failed")
                for s in self.slots:
                    if s.job is not None:
                        s.job.sink(Failed(500, f"internal error while generating ({type(e).__name__})"))
                        self._release(s, keep=False)

    def _tick(self) -> None:
        for s in self.slots:
            if s.job is not None and s.job.cancelled.is_set():
                self._release(s, keep=s.job.steps is None)
        prefilling = [s.job for s in self.slots if s.job is not None and s.job.steps is not None]
        if prefilling:
            self._prefill_step(min(prefilling, key=lambda j: j.slot))
        decoding = [s.job for s in self.slots if s.job is not None and s.job.pending is not None]
        if decoding:
            self._decode_step(decoding)
        self._gauge("busy_slots", sum(1 for s in self.slots if s.job is not None))
        with self.wake:
            self._gauge("queue_depth", self._waiting())

    def _admit(self) -> None:
        """Prepared requests into free slots, each where the longest prefix of it is cached. A
        request's other choices wait for choice 0's prompt, then copy it from its row."""
        waiting: list[Job] = []
        while self.ready:
            free = [s for s in self.slots if s.job is None]
            if not free:
                break
            job = self.ready.popleft()
            if job.cancelled.is_set():
                continue
            lead = job.leader
            if lead is not None and not lead.cancelled.is_set() and (lead.slot < 0 or lead.steps is not None):
                waiting.append(job)  # its leader's prompt is not in a row yet
                continue
            prompt = job.prompt
            assert prompt is not None and job.decoding is not None
            frames = [g[0] for g in prompt.grids]
            reuse = {s.index: reusable_prefix(s.ids, s.keys, prompt.ids, job.keys, self.pads, frames) for s in free}
            slot = max(free, key=lambda s: (reuse[s.index], -s.index))  # else the lowest: busy rows stay together
            keep = reuse[slot.index]
            if lead is not None and lead.slot >= 0 and self.slots[lead.slot].job is lead:
                copied = reusable_prefix(self.slots[lead.slot].ids, lead.keys, prompt.ids, job.keys, self.pads, frames)
                if copied > keep:
                    keep = self._copy_row(self.slots[lead.slot], slot, copied)
            self._start(slot, job, keep)
        self.ready.extendleft(reversed(waiting))

    def _copy_row(self, src: Slot, dst: Slot, n: int) -> int:
        """The first ``n`` cached tokens of ``src``'s row into ``dst``'s (keys, values, pictures): a
        copy of a few MB instead of a prefill."""
        for a in (*self.cache.keys, *self.cache.values):
            a[dst.index, :, :n] = a[src.index, :, :n]
        dst.ids, dst.keys = list(src.ids[:n]), list(src.keys)
        return n

    def _start(self, slot: Slot, job: Job, keep: int) -> None:
        prompt, cfg, row = job.prompt, self.model.config, self.rows[slot.index]
        assert prompt is not None and job.decoding is not None
        first = images_before(cfg, prompt, keep)
        row.lengths[0] = keep
        row.rope_deltas[0] = prefix_rope_delta(cfg, prompt, keep)
        emb = ds = None
        if job.features is not None and first < len(prompt.grids):
            row0 = sum(int(np.prod(g)) for g in prompt.grids[:first]) // cfg.vision.spatial_merge_size**2
            emb, ds = job.features[0][row0:], job.features[1][:, row0:]
        tail = Prompt(prompt.ids[keep:], None, prompt.grids[first:], prompt.videos[first:])
        slot.job, slot.ids, slot.keys = job, list(prompt.ids[:keep]), job.keys
        job.slot, job.cached = slot.index, keep
        job.parts = AnswerParts(self.pipe.tokenizer, job.decoding.think_end, job.decoding.stop)
        job.steps = self.model.prefill_steps(tail.ids, emb, ds, tail.image_grids, row, 1, tail.video_grids, self._chunk)
        self._count("prompt_tokens", len(prompt.ids))
        self._count("cached_prompt_tokens", keep)

    def _chunk(self) -> int:
        """Prompt tokens for the next call: the whole prompt (as memory allows) when nothing else
        runs; while other requests decode (their next token waits for this call), as many as take
        ``prefill_slice_ms`` at the speed the last cut chunks ran. Why time, not tokens: a chunk's
        cost differs thirtyfold between bundles and doubles while a picture is being encoded beside
        it; a fixed 64 tokens of a 4B prompt took 1.5-1.9 s and stalled every stream that long.
        (Seconds per token fall as chunks grow, so the size settles where a call takes the budget.)"""
        self._sliced = any(s.job is not None and s.job.pending is not None for s in self.slots)
        if not self._sliced:
            return self.settings.ctx_size
        return max(1, min(self.settings.ctx_size, int(self.settings.prefill_slice_ms / 1000 / self._token_s)))

    def _prefill_step(self, job: Job) -> None:
        assert job.steps is not None and job.prompt is not None
        t = time.perf_counter()
        before = int(self.cache.lengths[job.slot])
        out = next(job.steps)
        done, seconds = int(self.cache.lengths[job.slot]) - before, time.perf_counter() - t
        if self._sliced and done > 0:
            self._token_s = (self._token_s + seconds / done) / 2
        self._rate("prefill", done, seconds)
        if out is None:
            return
        job.steps = None
        self.slots[job.slot].ids = list(job.prompt.ids)
        self._emit(job, out[0, -1])

    def _decode_step(self, jobs: list[Job]) -> None:
        """One decoder call for the rows from the first to the last decoding slot (idle rows between
        them ride along and get their lengths back)."""
        lo, hi = min(j.slot for j in jobs), max(j.slot for j in jobs) + 1
        if (lo, hi) not in self._views:
            self._views[(lo, hi)] = self.cache.rows(lo, hi)
        view = self._views[(lo, hi)]
        tokens = np.zeros(hi - lo, np.int64)
        for j in jobs:
            tokens[j.slot - lo] = j.pending
        before = view.lengths.copy()
        t = time.perf_counter()
        logits = self.model.step(tokens, view)
        self._rate("decode", len(jobs), time.perf_counter() - t)
        idle = np.ones(hi - lo, bool)
        idle[[j.slot - lo for j in jobs]] = False
        view.lengths[idle] = before[idle]
        for j in jobs:
            self.slots[j.slot].ids.append(int(tokens[j.slot - lo]))
            j.pending = None
            self._emit(j, logits[j.slot - lo])

    def _emit(self, job: Job, logits: np.ndarray) -> None:
        """Sample the next token from ``logits`` and hand its text to the request (or finish it)."""
        d, parts = job.decoding, job.parts
        assert d is not None and parts is not None and job.prompt is not None
        try:
            if d.processor is not None:
                logits = d.processor(logits, job.prompt.ids, job.generated)
            token = int(d.sampler(logits[None])[0])
        except UserError as e:  # a grammar that can go no further: this request fails, the others go on
            job.sink(Failed(500, str(e)))
            return self._release(self.slots[job.slot], keep=False)
        if token in d.eos_ids:
            return self._finish(job, "stop")
        job.generated.append(token)
        self._count("generation_tokens", 1)
        lp = token_logprob(logits, token, d.logprobs) if d.logprobs is not None else None
        job.sink(Token(parts.push(token), lp))
        if parts.stopped:
            return self._finish(job, "stop")
        if len(job.generated) >= d.max_new_tokens:
            return self._finish(job, "length")
        job.pending = token

    def _finish(self, job: Job, reason: str) -> None:
        assert job.parts is not None and job.prompt is not None
        if not job.parts.stopped:
            tail = job.parts.flush()
            if tail:
                job.sink(Token(tail, None))
        job.sink(Finished(reason, len(job.prompt.ids), len(job.generated), job.cached))
        self._count("requests_finished", 1)
        self._release(self.slots[job.slot], keep=True)

    def _release(self, slot: Slot, keep: bool) -> None:
        """Free ``slot``; ``keep``: its row's tokens stay reusable (False: half-prefilled, forget them)."""
        slot.job = None
        if not keep:
            slot.ids, slot.keys = [], []
            self.rows[slot.index].reset()

    # ---- metrics (no-ops without --metrics) ----

    def _count(self, name: str, n: float) -> None:
        if self.metrics is not None:
            self.metrics.count(name, n)

    def _gauge(self, name: str, v: float) -> None:
        if self.metrics is not None:
            self.metrics.gauge(name, v)

    def _observe(self, name: str, v: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(name, v)

    def _rate(self, what: str, tokens: int, seconds: float) -> None:
        if self.metrics is not None and tokens > 0 and seconds > 0:
            self.metrics.gauge(f"{what}_tokens_per_second", tokens / seconds)

    def slot_states(self) -> list[dict[str, Any]]:
        row_bytes = self.cache.nbytes // max(1, self.cache.batch)
        return [{"id": s.index, "busy": s.job is not None, "cached_tokens": len(s.ids), "kv_cache": self.model.kv_cache,
                 "kv_cache_bytes": row_bytes} for s in self.slots]  # fmt: skip
