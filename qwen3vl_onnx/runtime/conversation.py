"""A chat that keeps its KV cache between turns, so each turn prefills only what is new.

Every turn renders the whole history with the checkpoint's template, as a stateless call would;
the longest prefix it shares with the tokens already cached is kept and only the rest is prefilled.
A prefix never ends inside an image's pad tokens, and an image counts as shared only if its pixels
are the same (equal pad tokens could stand for another picture). The MRoPE offset of the kept
prefix is recomputed on the host from its tokens and grids. Vision features of pictures already
seen come from a content-keyed cache.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .generate import Result, Stream, image_slices, prefill_input, prefix_rope_delta, stream_generate
from .prompt import Prompt
from .sampling import GenerationParams
from .tool_calls import ToolCall
from .vision_cache import VisionCache

if TYPE_CHECKING:
    from .pipeline import Pipeline


def _picture_spans(ids: Sequence[int], pads: set[int], frames: Sequence[int] | None) -> list[tuple[int, int]]:
    """[first pad, last pad + 1) of each picture. An image is one run of pad tokens, a video one run
    per temporal patch (``frames[i]``: runs of picture i; default one each)."""
    runs: list[list[int]] = []
    for i, t in enumerate(ids):
        if t in pads:
            if i and ids[i - 1] in pads:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
    spans, r = [], 0
    for f in frames if frames is not None else [1] * len(runs):
        if r + f > len(runs):
            break
        spans.append((runs[r][0], runs[r + f - 1][1]))
        r += f
    return spans


def reusable_prefix(cached: Sequence[int], cached_images: Sequence[str], ids: Sequence[int], images: Sequence[str],
                    pads: set[int], frames: Sequence[int] | None = None) -> int:  # fmt: skip
    """How many leading tokens of ``ids`` the cache can keep: the common prefix with ``cached``, cut
    back to the start of a picture whose pixels differ (``*_images``: content keys in order) or
    which it would split (an image's pads, a video anywhere between its first and last frame), and
    at least one token short of ``ids`` (a call needs a token to predict from)."""
    k = 0
    for a, b in zip(cached, ids, strict=False):
        if a != b:
            break
        k += 1
    k = min(k, len(ids) - 1)
    for n, (start, end) in enumerate(_picture_spans(ids, pads, frames)):
        if start >= k:
            break
        if n >= len(cached_images) or cached_images[n] != images[n] or k < end:
            return start
    return k


class Conversation:
    """The messages so far, the tokens in the KV cache, the cache itself and a vision cache.

    ``send`` adds a user message and streams the answer; when the stream ends the answer joins
    the history. ``drop_oldest=True`` (per call) lets a conversation that outgrew the context
    forget its oldest turns; by default it is refused with an error saying so.
    """

    def __init__(self, pipe: Pipeline, system: str | None = None, vision_cache_size: int = 32):
        self.pipe = pipe
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.vision = VisionCache(vision_cache_size)
        self.cache = pipe.model.new_cache()
        self.cached_ids: list[int] = []  # tokens whose keys and values are in ``cache``
        self.cached_images: list[str] = []  # content keys of the images among them, in order

    def reset(self, system: str | None = None) -> None:
        """Start over (the vision cache stays: it is keyed by content)."""
        self.messages = [{"role": "system", "content": system}] if system else []
        self.cache.reset()
        self.cached_ids, self.cached_images = [], []

    def send(self, content: str | list[dict[str, Any]], params: GenerationParams | None = None, drop_oldest: bool = False,
             **overrides: Any) -> Stream:  # fmt: skip
        """Ask ``content`` (text, or OpenAI-style parts with images); a :class:`Stream` of the answer.
        ``overrides`` are :class:`GenerationParams` fields, as for ``Pipeline.stream`` (``tools=``,
        ``response_format=`` included: an answer's calls join the history with it)."""
        return self._answer([{"role": "user", "content": content}], params, drop_oldest, **overrides)

    def reply_to_calls(self, results: list[str | list[dict[str, Any]]], params: GenerationParams | None = None,
                       drop_oldest: bool = False, **overrides: Any) -> Stream:  # fmt: skip
        """Give the last answer's tool calls their results (text or parts, pictures included), in the
        calls' order, and stream the answer that follows. Pass the same ``tools`` again."""
        last = self.messages[-1] if self.messages else {}
        calls = last.get("tool_calls") or [] if last.get("role") == "assistant" else []
        if len(results) != len(calls):
            raise UserError(f"the last answer made {len(calls)} tool call(s), got {len(results)} result(s)")
        turns = [{"role": "tool", "content": r, "tool_call_id": c["id"]} for r, c in zip(results, calls, strict=True)]
        return self._answer(turns, params, drop_oldest, **overrides)

    def _answer(self, new: list[dict[str, Any]], params: GenerationParams | None, drop_oldest: bool, **overrides: Any
                ) -> Stream:  # fmt: skip
        pipe = self.pipe
        t0 = time.perf_counter()
        params = pipe.params(params, **overrides)
        messages = [*self.messages, *new]
        prompt = pipe.prepare(messages, tools=params.tools)
        while len(prompt.ids) + 1 > pipe.context_length and drop_oldest and self._droppable(messages):
            messages = self._drop_turn(messages)
            prompt = pipe.prepare(messages, tools=params.tools)
        if len(prompt.ids) >= pipe.context_length:
            hint = "" if drop_oldest else " (reset it, or send with drop_oldest=True to forget the oldest turns)"
            raise UserError(f"conversation is {len(prompt.ids)} tokens, the context holds {pipe.context_length}{hint}")
        decoding = pipe.decoding(params, len(prompt.ids))
        images = [VisionCache.key(p, g) for p, g in zip(image_slices(prompt), prompt.grids, strict=True)]
        cfg = pipe.config
        pads = {cfg.image_token_id, cfg.video_token_id}
        keep = reusable_prefix(self.cached_ids, self.cached_images, prompt.ids, images, pads, [g[0] for g in prompt.grids])
        self._trim_to(prompt, keep)
        t1 = time.perf_counter()
        request = prefill_input(pipe.model, prompt, keep, self.vision)
        timings = {"preprocess_s": t1 - t0, "vision_s": time.perf_counter() - t1}
        self.cache.ensure(len(prompt.ids) + decoding.max_new_tokens)
        events = stream_generate(pipe.model, pipe.tokenizer, request, self.cache, decoding, timings, t0)
        return Stream(self._record(events, messages, prompt, images))

    def _trim_to(self, prompt: Prompt, keep: int) -> None:
        """Cut the cache back to the first ``keep`` tokens of ``prompt`` and set their MRoPE offset."""
        self.cache.trim(self.cache.length - keep)
        self.cache.rope_deltas[0] = prefix_rope_delta(self.pipe.config, prompt, keep)
        self.cached_ids = list(prompt.ids[:keep])

    def _record(self, events: Iterator[str | Result], messages: list[dict[str, Any]], prompt: Prompt,
                images: list[str]) -> Iterator[str | Result]:  # fmt: skip
        """Pass the stream through; at its end, the answer joins the history (a Thinking answer with
        its reasoning as ``reasoning_content``, the field the templates read) and the cache's tokens
        are known (every sampled token but the last was fed back). A stream stopped early leaves
        the question and the answer so far in the history."""
        said: dict[str, list[str]] = {"text": [], "reasoning": []}
        started = False
        try:
            for ev in events:
                started = True
                if isinstance(ev, Result):
                    fed = ev.token_ids if ev.finish_reason == "stop" else ev.token_ids[:-1]
                    self.cached_ids, self.cached_images = list(prompt.ids) + list(fed), images
                    self.messages = [*messages, self._reply(ev.text, ev.reasoning, ev.tool_calls)]
                else:
                    said[getattr(ev, "part", "text")].append(ev)
                yield ev
        except GeneratorExit:
            if started:  # the prompt is in the cache; what followed it is not known token by token
                self.cached_ids, self.cached_images = list(prompt.ids), images
                reasoning = "".join(said["reasoning"]) if self.pipe.thinking else None
                self.messages = [*messages, self._reply("".join(said["text"]), reasoning)]
            raise

    @staticmethod
    def _reply(text: str, reasoning: str | None, calls: list[ToolCall] | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if calls:
            msg["tool_calls"] = [c.to_dict() for c in calls]
        return msg

    @staticmethod
    def _droppable(messages: list[dict[str, Any]]) -> bool:
        return sum(1 for m in messages if m["role"] != "system") > 1

    @staticmethod
    def _drop_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Without the oldest user message and the replies before the next user message."""
        out = copy.copy(messages)
        first = next(i for i, m in enumerate(out) if m["role"] != "system")
        end = next((i for i in range(first + 1, len(out)) if out[i]["role"] == "user"), len(out) - 1)
        return out[:first] + out[end:]
