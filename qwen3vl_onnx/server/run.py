"""A request's run through the engine, whatever the route: its ``n`` jobs submitted together, their
events on one queue (tagged with the choice index), and the response built whole or streamed as
server-sent events. A client that goes away cancels the jobs, which frees their slots at the next
step; the server's shutdown gives running answers a grace, then ends them with an error a client sees.

What a route's answer looks like is its ``Shaper`` (one per choice): chat completions and the
legacy text completions differ only there.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from .engine import Accepted, Engine, Failed, Finished, Job, QueueFull, Token

if TYPE_CHECKING:
    from starlette.requests import Request

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
        """The next event; ClientGone if the client leaves first; ``SHUT`` once the grace is over."""
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


async def client_gone(request: Request) -> None:
    """Returns once the client has closed the connection (the body is already read, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Shaper(Protocol):
    """One choice's answer in a route's shape: ``push`` a token, get the stream's choice entries
    for it; ``finish`` once it ends; ``whole`` the non-streamed choice."""

    def push(self, ev: Token) -> list[dict[str, Any]]: ...

    def finish(self, ev: Finished) -> list[dict[str, Any]]: ...

    def whole(self, ev: Finished) -> dict[str, Any]: ...


class Choices:
    """A request's ``n`` jobs: submitted together, their events on one queue as (index, event)."""

    def __init__(self, engine: Engine, make: Callable[[int, Callable[[Any], None]], Job], n: int):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs: list[Job] = []
        self.early: list[tuple[int, object]] = []  # events that came while others were still being accepted
        for i in range(n):
            job = make(i, lambda ev, i=i: loop.call_soon_threadsafe(self.events.put_nowait, (i, ev)))
            job.leader = self.jobs[0] if self.jobs else None  # the others start from choice 0's prompt
            try:
                engine.submit(job)
            except QueueFull as e:
                self.cancel()
                raise ApiError(429, str(e)) from None
            self.jobs.append(job)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()

    async def next(self, drain: Drain, gone: asyncio.Future | None = None) -> object:
        if self.early:
            return self.early.pop(0)
        return await drain.next(self.events, gone)

    async def accepted(self, drain: Drain, gone: asyncio.Future) -> None:
        """Wait until every job is accepted: an ApiError for the first that failed (its siblings are cancelled)."""
        waiting = set(range(len(self.jobs)))
        while waiting:
            item = await drain.next(self.events, gone)
            if item is SHUT:
                raise ApiError(503, SHUT_MESSAGE, code="server_shutdown")
            i, ev = item  # type: ignore[misc]
            if isinstance(ev, Failed):
                raise ApiError(ev.status, ev.message)
            if isinstance(ev, Accepted):
                waiting.discard(i)
            else:
                self.early.append((i, ev))


def usage(done: list[Finished]) -> dict[str, Any]:
    """One request's usage: its prompt once, every choice's completion tokens."""
    prompt, cached, completion = done[0].prompt_tokens, done[0].cached_tokens, sum(f.completion_tokens for f in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


async def whole(choices: Choices, shapers: list[Shaper], drain: Drain, gone: asyncio.Future) -> tuple[list[dict], dict]:
    """Every choice to its end: the response's choices and usage (a 503 once the shutdown grace is over)."""
    done: dict[int, Finished] = {}
    try:
        while len(done) < len(shapers):
            item = await choices.next(drain, gone)
            if item is SHUT:
                raise ApiError(503, SHUT_MESSAGE, code="server_shutdown")
            i, ev = item  # type: ignore[misc]
            if isinstance(ev, Token):
                shapers[i].push(ev)
            elif isinstance(ev, Failed):
                raise ApiError(ev.status, ev.message)
            elif isinstance(ev, Finished):
                shapers[i].finish(ev)
                done[i] = ev
    finally:
        if len(done) < len(shapers):
            choices.cancel()
    return [shapers[i].whole(done[i]) for i in range(len(shapers))], usage([done[i] for i in range(len(shapers))])


Envelope = Callable[[list[dict], bool], dict]  # (choice entries, whole?) -> the response or chunk around them


async def stream(choices: Choices, shapers: list[Shaper], drain: Drain, envelope: Envelope, first: list[dict],
                 include_usage: bool) -> AsyncIterator[dict]:  # fmt: skip
    """Server-sent events: ``first`` entries, each choice's entries as they come, an error event if
    the run fails or the grace ends, the usage (``include_usage``), ``[DONE]``."""

    def event(body: dict) -> dict:
        return {"data": json.dumps(body, ensure_ascii=False)}

    done: dict[int, Finished] = {}
    ended = False
    try:
        for entry in first:
            yield event(envelope([entry], False))
        while len(done) < len(shapers):
            item = await choices.next(drain)
            if item is SHUT:
                ended = True
                choices.cancel()
                yield event(error_body(503, SHUT_MESSAGE, code="server_shutdown"))
                break
            i, ev = item  # type: ignore[misc]
            if isinstance(ev, Token):
                for entry in shapers[i].push(ev):
                    yield event(envelope([entry], False))
            elif isinstance(ev, Failed):
                ended = True
                choices.cancel()
                yield event(error_body(ev.status, ev.message))
                break
            elif isinstance(ev, Finished):
                done[i] = ev
                for entry in shapers[i].finish(ev):
                    yield event(envelope([entry], False))
        if not ended and include_usage:
            yield event({**envelope([], False), "usage": usage([done[i] for i in range(len(shapers))])})
        ended = True
        yield {"data": "[DONE]"}
    finally:
        if not ended:
            choices.cancel()


async def respond(choices: Choices, shapers: list[Shaper], request: Request, drain: Drain, stream_it: bool,
                  envelope: Envelope, first: list[dict], include_usage: bool) -> Any:  # fmt: skip
    """The response of a submitted run: whole (``envelope`` around the choices, with usage) or a
    stream. A client that leaves while its jobs wait, are prefilled or (not streaming) decode
    cancels them; once streaming, sse-starlette watches the connection instead."""
    from sse_starlette.sse import EventSourceResponse

    gone = asyncio.ensure_future(client_gone(request))
    try:
        await choices.accepted(drain, gone)
        if stream_it:
            # sse-starlette ends streams at once on shutdown unless given a grace; ours ends them itself
            return EventSourceResponse(stream(choices, shapers, drain, envelope, first, include_usage), ping=15,
                                       shutdown_grace_period=drain.grace + 1)  # fmt: skip
        entries, use = await whole(choices, shapers, drain, gone)
        return {**envelope(entries, True), "usage": use}
    except BaseException:
        choices.cancel()
        raise
    finally:
        gone.cancel()
