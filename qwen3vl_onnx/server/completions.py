"""``POST /v1/chat/completions``: a request body -> ``n`` jobs for the engine -> a response, whole or
as server-sent events (``run.py``); this module knows the chat shape: messages in, and out content,
``reasoning_content``, tool calls, log-probabilities."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi.concurrency import run_in_threadpool

from ..errors import UserError
from ..runtime.sampling import GenerationParams, TokenLogprob
from ..runtime.text_stream import TokenBytes
from .answer import Answer
from .engine import Finished, Job, Token
from .media import MediaError, pipeline_messages
from .run import ApiError, Choices, respond
from .schemas import ChatCompletionRequest
from .settings import ServerSettings

if TYPE_CHECKING:
    from starlette.requests import Request

    from .state import State

MAX_N = 8  # choices per request: each is a row of the batch (a slot) while it runs


def check_model(model: str | None, settings: ServerSettings) -> None:
    """A request without a model means the one served (as vLLM and llama.cpp take it)."""
    if model is not None and model != settings.model_name:
        raise ApiError(404, f"model {model[:80]!r} is not served here (GET /v1/models lists {settings.model_name!r})",
                       "model", "model_not_found")  # fmt: skip


def check_n(n: int | None, settings: ServerSettings) -> int:
    n = 1 if n is None else n
    limit = min(MAX_N, settings.parallel)
    if n > limit:
        raise ApiError(400, f"n is {n}, at most {limit} here (one slot each: --parallel {settings.parallel}, at most {MAX_N})",
                       "n")  # fmt: skip
    return n


def sampling_fields(body: Any, settings: ServerSettings) -> dict[str, Any]:
    """The sampling fields chat and text completions share, as GenerationParams fields."""
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit():
            raise ApiError(400, f"logit_bias key {key[:20]!r} is not a token id", "logit_bias")
        bias[int(key)] = value
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 16:
        raise ApiError(400, f"at most 16 stop strings, got {len(stop)}", "stop")
    return dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0, presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0, logit_bias=bias, stop=stop, seed=body.seed,
                ignore_eos=bool(body.ignore_eos))  # fmt: skip


def generation_params(body: ChatCompletionRequest, settings: ServerSettings) -> tuple[GenerationParams, bool]:
    """The body's sampling fields as GenerationParams, and whether it set a token limit itself."""
    limit = body.max_completion_tokens or body.max_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    params = GenerationParams(
        max_new_tokens=limit or settings.ctx_size, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        response_format=body.response_format.as_dict() if body.response_format is not None else None,
        tools=body.tools or None, tool_choice=body.tool_choice, parallel_tool_calls=body.parallel_tool_calls is not False,
        **sampling_fields(body, settings),
    )  # fmt: skip
    return params, limit is not None


def seeded(params: GenerationParams, i: int) -> GenerationParams:
    """Choice ``i``'s parameters: with a seed, each choice its own (seed + i), so they differ but repeat."""
    return params if params.seed is None or i == 0 else dataclasses.replace(params, seed=params.seed + i)


def logprobs_entry(token_bytes: TokenBytes, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_bytes.tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(token_bytes(token))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]}


class ChatShaper:
    """One chat choice: its deltas as they come, and the whole message at the end."""

    def __init__(self, index: int, tools: bool, thinking: bool, token_bytes: TokenBytes, logprobs: bool):
        self.index, self.answer, self.token_bytes, self.logprobs = index, Answer(tools, thinking), token_bytes, logprobs
        self.lps: list[TokenLogprob] = []

    def _entry(self, delta: dict, lp: dict | None = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": self.index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def push(self, ev: Token) -> list[dict[str, Any]]:
        if ev.logprob is not None:
            self.lps.append(ev.logprob)
        lp = logprobs_entry(self.token_bytes, [ev.logprob]) if ev.logprob is not None else None
        deltas = self.answer.push(ev.delta) or ([{}] if lp else [])
        return [self._entry(d, lp if k == 0 else None) for k, d in enumerate(deltas)]  # a token's logprob on its first delta

    def finish(self, ev: Finished) -> list[dict[str, Any]]:
        reason = self.answer.finish_reason(ev.finish_reason)
        return [*(self._entry(d) for d in self.answer.flush()), self._entry({}, finish=reason)]

    def whole(self, ev: Finished) -> dict[str, Any]:
        lps = logprobs_entry(self.token_bytes, self.lps) if self.logprobs else None
        reason = self.answer.finish_reason(ev.finish_reason)
        return {"index": self.index, "message": self.answer.message(), "finish_reason": reason, "logprobs": lps}


async def chat_completion(body: ChatCompletionRequest, state: State, request: Request) -> Any:
    engine, settings = state.ready(), state.settings
    check_model(body.model, settings)
    n = check_n(body.n, settings)
    if body.functions is not None or body.function_call is not None:
        field = "functions" if body.functions is not None else "function_call"
        raise ApiError(400, f"'{field}' (OpenAI's deprecated function calling) is not supported; send the functions "
                            "as 'tools' (and 'tool_choice')", field)  # fmt: skip
    if body.tool_choice is not None and body.tool_choice != "none" and not body.tools:
        raise ApiError(400, "tool_choice needs tools: send 'tools' with it, or leave it out", "tool_choice")
    params, explicit = generation_params(body, settings)
    try:
        params = engine.pipe.params(params)
        video = engine.pipe.processors.video
        messages = await run_in_threadpool(pipeline_messages, body.messages, settings, video.max_frames if video else None)
    except UserError as e:
        said = str(e)
        raise ApiError(400, said, next((f for f in ("tool_choice", "tools", "response_format") if said.startswith(f)), None)
                       ) from None  # fmt: skip
    except MediaError as e:
        raise ApiError(e.status, str(e)) from None
    choices = Choices(engine, lambda i, sink: Job(messages, seeded(params, i), sink, explicit_max=explicit), n)
    head = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": settings.model_name}
    token_bytes = TokenBytes(engine.pipe.tokenizer)
    shapers = [ChatShaper(i, bool(params.tools), engine.pipe.thinking, token_bytes, params.logprobs is not None)
               for i in range(n)]  # fmt: skip

    def envelope(entries: list[dict], whole: bool) -> dict[str, Any]:
        return {**head, "object": "chat.completion" if whole else "chat.completion.chunk", "choices": entries}

    first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
             for i in range(n)]  # fmt: skip
    usage = body.stream_options is not None and bool(body.stream_options.include_usage)
    return await respond(choices, shapers, request, state.drain, bool(body.stream), envelope, first, usage)  # type: ignore[arg-type]
