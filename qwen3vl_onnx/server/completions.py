"""``POST /v1/chat/completions``: a request body -> a job for the engine -> a response, whole or as
server-sent events. A client that goes away cancels its job, which frees its slot at the next step."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from ..errors import UserError
from ..runtime.sampling import GenerationParams, TokenLogprob
from ..runtime.text_stream import TokenBytes
from .answer import Answer
from .engine import Accepted, Failed, Finished, Job, QueueFull, Token
from .media import MediaError, pipeline_messages
from .schemas import ChatCompletionRequest
from .settings import ServerSettings

if TYPE_CHECKING:
    from starlette.requests import Request

    from .app import State


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error", 503: "unavailable"}  # fmt: skip


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: a response's body, and the event that ends a stream that failed."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """An answer other than 200: status, message and optionally the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def generation_params(body: ChatCompletionRequest, settings: ServerSettings) -> tuple[GenerationParams, bool]:
    """The body's sampling fields as GenerationParams, and whether it set a token limit itself."""
    limit = body.max_completion_tokens or body.max_tokens
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit():
            raise ApiError(400, f"logit_bias key {key[:20]!r} is not a token id", "logit_bias")
        bias[int(key)] = value
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 16:
        raise ApiError(400, f"at most 16 stop strings, got {len(stop)}", "stop")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    params = GenerationParams(
        max_new_tokens=limit or settings.ctx_size, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        min_p=body.min_p or 0.0, repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0, logit_bias=bias,
        stop=stop, seed=body.seed, ignore_eos=bool(body.ignore_eos), logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        response_format=body.response_format.as_dict() if body.response_format is not None else None,
        tools=body.tools or None, tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )  # fmt: skip
    return params, limit is not None


def _logprobs(token_bytes: TokenBytes, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_bytes.tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(token_bytes(token))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]}


def _usage(f: Finished) -> dict[str, Any]:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": f.cached_tokens}}  # fmt: skip


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


class Drain:
    """The server's shutdown as requests see it: from the signal on, no new connections (uvicorn),
    and the answers already running get ``grace`` seconds to finish; one still running then ends
    with a 503, or a stream with an error event, instead of a connection cut mid-answer."""

    def __init__(self, grace: float):
        self.grace = grace
        self.deadline: float | None = None
        self._begun: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        """Called on the server's event loop before the first request."""
        self._loop, self._begun = asyncio.get_running_loop(), asyncio.Event()

    def begin(self) -> None:
        """The shutdown signal (from a signal handler or another thread)."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace
            if self._loop is not None and self._begun is not None:
                self._loop.call_soon_threadsafe(self._begun.set)

    async def next(self, events: asyncio.Queue, gone: asyncio.Future | None = None) -> object:
        """The job's next event; ClientGone if the client leaves first; ``SHUT`` once the grace is over."""
        while True:
            getter = asyncio.ensure_future(events.get())
            waits: set[asyncio.Future] = {getter} if gone is None else {getter, gone}
            begun = None
            if self.deadline is None and self._begun is not None:
                begun = asyncio.ensure_future(self._begun.wait())
                waits.add(begun)
            left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            try:
                done, _ = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when this task is cancelled (a stream's client left): no pending task left behind
                if begun is not None:
                    begun.cancel()
                if not getter.done():
                    getter.cancel()
            if getter in done:
                return getter.result()
            if gone is not None and gone in done:
                raise ClientGone
            if begun is None or begun not in done:
                return SHUT  # the grace ran out (or it was 0)


SHUT = object()  # Drain.next's answer once the server's shutdown grace is over
SHUT_MESSAGE = "the server is shutting down and its grace period ended before this answer did"


async def _event(drain: Drain, events: asyncio.Queue, gone: asyncio.Future) -> object:
    """The job's next event while the client waits for a whole response: a 503 once the grace is over."""
    ev = await drain.next(events, gone)
    if ev is SHUT:
        raise ApiError(503, SHUT_MESSAGE, code="server_shutdown")
    return ev


async def _client_gone(request: Request) -> None:
    """Returns once the client has closed the connection (the body is already read, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def chat_completion(body: ChatCompletionRequest, state: State, request: Request) -> Any:
    engine, settings = state.ready(), state.settings
    if body.model is not None and body.model != settings.model_name:  # no model: the one served (as vLLM, llama.cpp)
        raise ApiError(404, f"model {body.model[:80]!r} is not served here (GET /v1/models lists {settings.model_name!r})",
                       "model", "model_not_found")  # fmt: skip
    if body.n not in (None, 1):
        raise ApiError(400, "only n = 1 is supported", "n")
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
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(messages, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), explicit_max=explicit)
    try:
        engine.submit(job)
    except QueueFull as e:
        raise ApiError(429, str(e)) from None
    # a client that leaves while its request waits, is prefilled or (not streaming) decodes cancels
    # it; once streaming, sse-starlette watches the connection instead
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        first = await _event(state.drain, events, gone)
        if isinstance(first, Failed):
            raise ApiError(first.status, first.message)
        assert isinstance(first, Accepted)
        head = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": settings.model_name}
        token_bytes, thinking = TokenBytes(engine.pipe.tokenizer), engine.pipe.thinking
        if body.stream:
            usage = body.stream_options is not None and bool(body.stream_options.include_usage)
            # sse-starlette ends streams at once on shutdown unless given a grace; ours ends them itself
            return EventSourceResponse(_stream(job, events, head, token_bytes, thinking, usage, state.drain), ping=15,
                                       shutdown_grace_period=state.drain.grace + 1)  # fmt: skip
        return await _whole(job, events, gone, head, token_bytes, thinking, state.drain)
    except BaseException:
        job.cancelled.set()
        raise
    finally:
        gone.cancel()


async def _whole(job: Job, events: asyncio.Queue, gone: asyncio.Future, head: dict, token_bytes: TokenBytes, thinking: bool,
                 drain: Drain) -> dict[str, Any]:  # fmt: skip
    answer = Answer(bool(job.params.tools), thinking)
    lps: list[TokenLogprob] = []
    ev: object = None
    try:
        while True:
            ev = await _event(drain, events, gone)
            if isinstance(ev, Token):
                answer.push(ev.delta)
                if ev.logprob is not None:
                    lps.append(ev.logprob)
            elif isinstance(ev, Failed):
                raise ApiError(ev.status, ev.message)
            elif isinstance(ev, Finished):
                answer.flush()
                break
    finally:
        if not isinstance(ev, Finished):
            job.cancelled.set()
    assert isinstance(ev, Finished)
    choice = {"index": 0, "message": answer.message(), "finish_reason": answer.finish_reason(ev.finish_reason),
              "logprobs": _logprobs(token_bytes, lps) if job.params.logprobs is not None else None}  # fmt: skip
    return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(ev)}


async def _stream(job: Job, events: asyncio.Queue, head: dict, token_bytes: TokenBytes, thinking: bool, include_usage: bool,
                  drain: Drain) -> AsyncIterator[dict]:  # fmt: skip
    def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"data": json.dumps({**head, "object": "chat.completion.chunk", "choices": [choice]}, ensure_ascii=False)}

    answer = Answer(bool(job.params.tools), thinking)
    done = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while not done:
            ev = await drain.next(events)
            if ev is SHUT:
                done = True
                job.cancelled.set()
                yield {"data": json.dumps(error_body(503, SHUT_MESSAGE, code="server_shutdown"))}
            elif isinstance(ev, Token):
                lp = _logprobs(token_bytes, [ev.logprob]) if ev.logprob is not None else None
                deltas = answer.push(ev.delta) or ([{}] if lp else [])
                for k, delta in enumerate(deltas):  # a token's log-probability rides on its first delta
                    yield chunk(delta, logprobs=lp if k == 0 else None)
            elif isinstance(ev, Failed):
                done = True
                yield {"data": json.dumps(error_body(ev.status, ev.message))}
            elif isinstance(ev, Finished):
                done = True
                for delta in answer.flush():
                    yield chunk(delta)
                yield chunk({}, answer.finish_reason(ev.finish_reason))
                if include_usage:
                    yield {"data": json.dumps({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(ev)})}
        yield {"data": "[DONE]"}
    finally:
        if not done:
            job.cancelled.set()
