"""``POST /v1/responses``, OpenAI's Responses API as agent SDKs call it: ``input`` as text or items
(messages with text and images, earlier ``function_call`` items and their ``function_call_output``),
``instructions``, function ``tools``, ``text.format`` (JSON schema), streaming as typed events.

Each request becomes a chat conversation for the engine (the same template, media rules and
grammars as ``/v1/chat/completions``). ``previous_response_id`` continues a response this server
gave: the last ``STORED`` responses (with ``store`` not false) are kept in memory, not on disk, so
an id from before a restart, or older than those, is a 404 naming it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.concurrency import run_in_threadpool

from ..errors import UserError
from ..runtime.sampling import GenerationParams
from .answer import Answer
from .completions import check_model
from .engine import Failed, Finished, Job, Token
from .media import MediaError, pipeline_messages
from .run import SHUT, SHUT_MESSAGE, ApiError, Choices, client_gone, error_body, whole
from .schemas import Message, ResponsesRequest

if TYPE_CHECKING:
    from starlette.requests import Request

    from .state import State

STORED = 256  # responses kept for previous_response_id


class ResponseStore:
    """The conversations of the last ``STORED`` responses, by response id."""

    def __init__(self, size: int = STORED):
        self.size = size
        self.items: collections.OrderedDict[str, list[dict]] = collections.OrderedDict()

    def get(self, rid: str) -> list[dict]:
        if rid not in self.items:
            raise ApiError(404, f"previous_response_id {rid[:60]!r} is not among the last {self.size} responses this server "
                                "keeps in memory", "previous_response_id", "previous_response_not_found")  # fmt: skip
        return self.items[rid]

    def put(self, rid: str, messages: list[dict]) -> None:
        self.items[rid] = messages
        while len(self.items) > self.size:
            self.items.popitem(last=False)


def _content(content: Any, where: str) -> str | list[dict]:
    """A message's content (text, or input_text/input_image/output_text parts) in chat form."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be text or a list of parts", where)
    parts: list[dict] = []
    for k, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            parts.append({"type": "text", "text": p["text"]})
        elif kind == "input_image" and isinstance(p.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
        else:
            raise ApiError(400, f"{where}.content[{k}]: part type {kind!r} is not supported (input_text, input_image, "
                                "output_text)", where)  # fmt: skip
    return parts


def chat_messages(body: ResponsesRequest, store: ResponseStore) -> list[dict]:
    """The request's conversation as chat messages: the previous response's, then ``input``."""
    out: list[dict] = [dict(m) for m in store.get(body.previous_response_id)] if body.previous_response_id else []
    if body.instructions:
        out = [m for m in out if m["role"] != "system"]
        out.insert(0, {"role": "system", "content": body.instructions})
    items = [{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role") in ("user", "assistant", "system", "developer"):
            out.append({"role": item["role"], "content": _content(item.get("content"), where)})
        elif kind == "function_call" and isinstance(item.get("name"), str) and isinstance(item.get("call_id"), str):
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}  # fmt: skip
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output" and isinstance(item.get("call_id"), str):
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _content(output, where)})  # fmt: skip
        elif kind == "reasoning":
            continue  # an earlier answer's reasoning: the templates drop it from the history
        else:
            raise ApiError(400, f"{where}: item type {kind!r} is not supported (message, function_call, "
                                "function_call_output, reasoning)", "input")  # fmt: skip
    return out


def _tools(body: ResponsesRequest) -> tuple[list[dict] | None, Any]:
    """Function tools and tool_choice in chat form (other tool types are refused by name)."""
    tools = []
    for i, t in enumerate(body.tools or []):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise ApiError(400, f"tools[{i}]: tool type {kind!r} is not supported here (function only)", "tools")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        tools.append({"type": "function", "function": fn})
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return tools or None, choice


def _format(body: ResponsesRequest) -> dict | None:
    fmt = (body.text or {}).get("format") if isinstance(body.text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type", "text") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    return {"type": fmt.get("type")}


class ResponseShaper:
    """One response's output items, built as the answer comes, and its typed stream events."""

    def __init__(self, tools: bool, thinking: bool):
        self.answer = Answer(tools, thinking)
        self.msg_id = "msg_" + uuid.uuid4().hex[:24]
        self.text_open = False
        self.reasoning: list[str] = []
        self.calls: dict[int, dict] = {}  # call index -> its output item

    def push(self, ev: Token) -> list[dict]:
        return self._events(self.answer.push(ev.delta))

    def finish(self, ev: Finished) -> list[dict]:
        out = self._events(self.answer.flush())
        if self.text_open:
            text = "".join(self.answer.said["text"])
            at = self._text_index
            out += [{"type": "response.output_text.done", "item_id": self.msg_id, "output_index": at, "content_index": 0,
                     "text": text},
                    {"type": "response.output_item.done", "output_index": at, "item": self._message(text)}]  # fmt: skip
        for item in self.calls.values():
            item["status"] = "completed"
            out += [{"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": item["_out"],
                     "arguments": item["arguments"]},
                    {"type": "response.output_item.done", "output_index": item["_out"], "item": self._public(item)}]  # fmt: skip
        return out

    def whole(self, ev: Finished) -> dict:
        return {"output": self.output(), "finish_reason": ev.finish_reason}

    def _message(self, text: str) -> dict:
        return {"type": "message", "id": self.msg_id, "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip

    @staticmethod
    def _public(item: dict) -> dict:
        return {k: v for k, v in item.items() if not k.startswith("_")}

    def output(self) -> list[dict]:
        items: list[tuple[int, dict]] = []
        reasoning = "".join(self.answer.said["reasoning"])
        if self.answer.thinking and reasoning:
            items.append((-1, {"type": "reasoning", "id": "rs_" + self.msg_id[4:], "summary": [],
                               "content": [{"type": "reasoning_text", "text": reasoning}]}))  # fmt: skip
        text = "".join(self.answer.said["text"])
        if text or not self.answer.tool_calls:
            items.append((getattr(self, "_text_index", 0), self._message(text)))
        for call in self.answer.tool_calls:
            item = next((c for c in self.calls.values() if c["call_id"] == call.id), None)
            public = {"type": "function_call", "id": "fc_" + call.id[5:], "call_id": call.id, "name": call.name,
                      "arguments": call.arguments, "status": "completed"}  # fmt: skip
            items.append((item["_out"] if item else len(items), public))
        return [it for _, it in sorted(items, key=lambda x: x[0])]

    def _events(self, deltas: list[dict]) -> list[dict]:
        out: list[dict] = []
        for d in deltas:
            if "content" in d:
                if not self.text_open:
                    self.text_open, self._text_index = True, self._next_index()
                    out += [{"type": "response.output_item.added", "output_index": self._text_index,
                             "item": {**self._message(""), "status": "in_progress", "content": []}},
                            {"type": "response.content_part.added", "item_id": self.msg_id, "output_index": self._text_index,
                             "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}]  # fmt: skip
                out.append({"type": "response.output_text.delta", "item_id": self.msg_id, "output_index": self._text_index,
                            "content_index": 0, "delta": d["content"]})  # fmt: skip
            elif "reasoning_content" in d:
                out.append({"type": "response.reasoning_text.delta", "item_id": "rs_" + self.msg_id[4:], "output_index": 0,
                            "content_index": 0, "delta": d["reasoning_content"]})  # fmt: skip
            for tc in d.get("tool_calls", []):
                if tc.get("id"):
                    item = {"type": "function_call", "id": "fc_" + tc["id"][5:], "call_id": tc["id"], "arguments": "",
                            "name": tc["function"]["name"], "status": "in_progress", "_out": self._next_index()}  # fmt: skip
                    self.calls[tc["index"]] = item
                    out.append({"type": "response.output_item.added", "output_index": item["_out"], "item": self._public(item)})
                elif tc["function"].get("arguments"):
                    item = self.calls[tc["index"]]
                    item["arguments"] += tc["function"]["arguments"]
                    out.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                                "output_index": item["_out"], "delta": tc["function"]["arguments"]})  # fmt: skip
        return out

    def _next_index(self) -> int:
        self._count = getattr(self, "_count", 0) + 1
        return self._count - 1


async def create_response(body: ResponsesRequest, state: State, request: Request, store: ResponseStore) -> Any:
    engine, settings = state.ready(), state.settings
    check_model(body.model, settings)
    tools, choice = _tools(body)
    history = chat_messages(body, store)
    params = GenerationParams(max_new_tokens=body.max_output_tokens or settings.ctx_size, temperature=body.temperature,
                              top_p=body.top_p, seed=body.seed, response_format=_format(body), tools=tools, tool_choice=choice,
                              parallel_tool_calls=body.parallel_tool_calls is not False)  # fmt: skip
    try:
        params = engine.pipe.params(params)
        video = engine.pipe.processors.video
        parsed = [Message(**m) for m in history]
        messages = await run_in_threadpool(pipeline_messages, parsed, settings, video.max_frames if video else None)
    except UserError as e:
        raise ApiError(400, str(e)) from None
    except MediaError as e:
        raise ApiError(e.status, str(e)) from None
    except ValueError as e:  # pydantic: an item the chat schema cannot take
        raise ApiError(400, f"input: {str(e).splitlines()[0]}", "input") from None
    choices = Choices(engine, lambda i, sink: Job(messages, params, sink, explicit_max=body.max_output_tokens is not None), 1)
    shaper = ResponseShaper(bool(tools), engine.pipe.thinking)
    rid = "resp_" + uuid.uuid4().hex[:24]
    base = {"id": rid, "object": "response", "created_at": int(time.time()), "model": settings.model_name, "error": None,
            "instructions": body.instructions, "tools": body.tools or [], "tool_choice": body.tool_choice or "auto",
            "parallel_tool_calls": body.parallel_tool_calls is not False, "temperature": body.temperature,
            "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id, "text": body.text or {"format": {"type": "text"}},
            "store": body.store is not False, "metadata": body.metadata or {}}  # fmt: skip

    def final(output: list[dict], reason: str, use: dict) -> dict:
        done = reason != "length"
        if body.store is not False:
            store.put(rid, [*history, _assistant(output)])
        return {**base, "status": "completed" if done else "incomplete", "output": output,
                "incomplete_details": None if done else {"reason": "max_output_tokens"},
                "usage": {"input_tokens": use["prompt_tokens"], "output_tokens": use["completion_tokens"],
                          "total_tokens": use["total_tokens"], "input_tokens_details": use["prompt_tokens_details"],
                          "output_tokens_details": {"reasoning_tokens": 0}}}  # fmt: skip

    gone = asyncio.ensure_future(client_gone(request))
    try:
        await choices.accepted(state.drain, gone)
        if body.stream:
            from sse_starlette.sse import EventSourceResponse

            return EventSourceResponse(_events(choices, shaper, state, base, final), ping=15,
                                       shutdown_grace_period=state.drain.grace + 1)  # fmt: skip
        entries, use = await whole(choices, [shaper], state.drain, gone)
        return final(entries[0]["output"], entries[0]["finish_reason"], use)
    except BaseException:
        choices.cancel()
        raise
    finally:
        gone.cancel()


def _assistant(output: list[dict]) -> dict:
    """A response's output as the assistant message of its stored conversation."""
    text = "".join(p["text"] for it in output if it["type"] == "message" for p in it["content"])
    calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in output if it["type"] == "function_call"]  # fmt: skip
    return {"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}


async def _events(choices: Choices, shaper: ResponseShaper, state: State, base: dict, final: Any) -> AsyncIterator[dict]:
    """The typed event stream: created, in_progress, each item's events, completed (or an error)."""
    seq = 0

    def event(body: dict) -> dict:
        nonlocal seq
        seq += 1
        return {"event": body["type"], "data": json.dumps({**body, "sequence_number": seq - 1}, ensure_ascii=False)}

    ended = False
    try:
        start = {**base, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
        yield event({"type": "response.created", "response": start})
        yield event({"type": "response.in_progress", "response": start})
        while True:
            item = await choices.next(state.drain)
            if item is SHUT:
                ended = True
                choices.cancel()
                yield event({"type": "error", **error_body(503, SHUT_MESSAGE, code="server_shutdown")["error"]})
                return
            _, ev = item  # type: ignore[misc]
            if isinstance(ev, Token):
                for e in shaper.push(ev):
                    yield event(e)
            elif isinstance(ev, Failed):
                ended = True
                yield event({"type": "error", **error_body(ev.status, ev.message)["error"]})
                return
            elif isinstance(ev, Finished):
                for e in shaper.finish(ev):
                    yield event(e)
                use = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                       "total_tokens": ev.prompt_tokens + ev.completion_tokens,
                       "prompt_tokens_details": {"cached_tokens": ev.cached_tokens}}  # fmt: skip
                response = final(shaper.output(), ev.finish_reason, use)
                ended = True
                kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
                yield event({"type": kind, "response": response})
                return
    finally:
        if not ended:
            choices.cancel()
