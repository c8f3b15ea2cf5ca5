"""Tool calls out of an answer's text: Qwen writes each as
``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>``.

``split_calls`` parses a whole text into its content (what is outside the calls) and its calls;
``CallStream`` does the same over text deltas as they come, so a stream shows content at once, and
for a call its id and name first, then argument fragments. Both read a call the same way, so the
fragments concatenate to exactly the whole answer's ``arguments``, and the content is the same text.
A call's ``arguments`` is the JSON text the model wrote for them (canonical under the tool grammar);
a call whose JSON does not parse stays in the content as the model wrote it, never an error.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .text_stream import Delta

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# the head of a call's JSON: its name, then where its arguments begin
_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'\s*,\s*"arguments"\s*:\s*')


@dataclass
class ToolCall:
    """One call: OpenAI's ``{"id", "type": "function", "function": {"name", "arguments"}}``."""

    name: str
    arguments: str  # JSON text (for a call cut off by max_tokens, the part that was written)
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _head(body: str) -> tuple[str, int | None] | None:
    """The call's name once written, and where its arguments begin once they do (else None)."""
    m = _NAME.match(body)
    if m is None:
        return None
    try:
        name = json.loads(f'"{m.group(1)}"')
    except ValueError:
        return None
    a = _ARGS.match(body, m.end())
    return name, a.end() if a else None


def _json_end(body: str) -> int | None:
    """Where the JSON value at the start of ``body`` ends, or None while it is incomplete (a
    ``</tool_call>`` inside one of its strings is text, not the end of the call)."""
    text = body.lstrip()
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return len(body) - len(text) + end


def read_call(body: str, closed: bool) -> ToolCall | None:
    """The call in ``body`` (the text between the tags), or None when it does not begin as one (a
    call needs its name). Its arguments are the text between the head and the object's closing
    brace; a call cut off keeps the arguments written so far (none, if it was cut before them)."""
    head = _head(body)
    if head is None:
        return None
    name, start = head
    if start is None:
        return ToolCall(name, "")
    text = body.rstrip()
    if not closed or not text.endswith("}"):
        return ToolCall(name, body[start:])
    return ToolCall(name, text[start:-1].rstrip())


def split_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole text; see ``CallStream`` for the same over deltas."""
    s = CallStream()
    content = s.push(text) + s.flush()
    return "".join(p for p in content if isinstance(p, str)), [p for p in content if isinstance(p, ToolCall)]


@dataclass
class CallStart:
    """A call's first delta: its index among the answer's calls, id and name."""

    index: int
    call: ToolCall


@dataclass
class CallArgs:
    """A fragment of call ``index``'s arguments."""

    index: int
    text: str


class CallStream:
    """Text deltas in; out, in order: content text (``str``), ``CallStart`` and ``CallArgs`` while a
    call is written, and each finished ``ToolCall``. Content next to a call loses the whitespace
    between them, and the content as a whole its leading and trailing whitespace."""

    def __init__(self, first_index: int = 0):
        self.index = first_index  # the next call's index (reasoning and answer share the count)
        self.buf = ""  # text not yet handed out
        self.body: str | None = None  # inside a call: its text so far
        self.sent = 0  # characters of the open call's arguments handed out
        self.started: CallStart | None = None
        self.scan = 0  # where in the open call's text to look for its closing tag
        self.ws = ""  # whitespace held back until text follows it
        self.after_call = True  # at the start, as right after a call, leading whitespace goes
        self.shown = False  # some content was handed out
        self.ws_before = ""  # the whitespace before the open call, should it turn out not to be one

    def push(self, delta: str) -> list:
        self.buf += delta
        out: list = []
        while self._step(out):
            pass
        return out

    def flush(self) -> list:
        """At the end: a call left open (cut by max_tokens) keeps what was written; one cut before
        its name is dropped (it holds nothing a client could use, and its markup is no content)."""
        out: list = []
        if self.body is not None:
            body = self.body + self.buf
            call = read_call(body, closed=False)
            if call is not None:
                if self.started is None:
                    self.started = CallStart(self.index, ToolCall(call.name, ""))
                    self.index += 1
                    out.append(self.started)
                out.append(CallArgs(self.started.index, call.arguments[self.sent :]))
                self.started.call.arguments = call.arguments
                out.append(self.started.call)
        else:
            self._text(out, self.buf)
        self.buf, self.body, self.ws = "", None, ""
        return [x for x in out if not (isinstance(x, CallArgs) and not x.text)]

    def _step(self, out: list) -> bool:
        if self.body is None:
            at = self.buf.find(OPEN)
            if at < 0:
                keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1) if OPEN.startswith(self.buf[-k:])), 0)
                self._text(out, self.buf[: len(self.buf) - keep], hold_ws=True)
                self.buf = self.buf[len(self.buf) - keep :]
                return False
            self._text(out, self.buf[:at], hold_ws=True)
            self.ws_before, self.ws = self.ws, ""
            self.body, self.buf, self.sent, self.started = "", self.buf[at + len(OPEN) :], 0, None
            self.scan = 0
            return True
        self.body += self.buf
        self.buf = ""
        at = self._close_at()
        if at < 0:
            self._open_call(out, self.body)
            return False
        body, self.buf, self.body = self.body[:at], self.body[at + len(CLOSE) :], None
        call = read_call(body, closed=True)
        if call is None:  # not a call after all: the model's text, as it wrote it
            self.ws = self.ws_before
            self._text(out, OPEN + body + CLOSE, hold_ws=True)
            return True
        if self.started is None:  # the whole call came at once
            self.started = CallStart(self.index, ToolCall(call.name, ""))
            self.index += 1
            out.append(self.started)
        whole = self.started.call
        whole.arguments = call.arguments
        out += [CallArgs(self.started.index, call.arguments[self.sent :]), whole]
        self.started, self.after_call, self.ws = None, True, ""
        return True

    def _close_at(self) -> int:
        """Where in the open call's text its closing tag is: the first one after which the call's
        JSON is complete (one inside an argument string is part of the arguments); -1 if none yet."""
        assert self.body is not None
        at = self.body.find(CLOSE, self.scan)
        while at >= 0:
            body = self.body[:at]
            end = _json_end(body)
            if (end is not None and not body[end:].strip()) or _head(body) is None:
                return at
            at = self.body.find(CLOSE, at + 1)
        self.scan = max(self.scan, len(self.body) - len(CLOSE) + 1)  # earlier tags were inside strings
        return -1

    def _open_call(self, out: list, body: str) -> None:
        """Inside a call: hand out its start and the arguments written so far, but for a tail that
        may still be the call's closing brace or tag."""
        head = _head(body)
        if head is None:
            return
        if self.started is None:
            self.started = CallStart(self.index, ToolCall(head[0], ""))
            self.index += 1
            out.append(self.started)
        if head[1] is None:
            return
        args = body[head[1] :]
        tag = next((k for k in range(min(len(CLOSE) - 1, len(args)), 0, -1) if CLOSE.startswith(args[-k:])), 0)
        text = args[: len(args) - tag].rstrip()  # the start of a closing tag is not arguments
        safe = len(text.removesuffix("}").rstrip())  # nor what may be the call's own closing brace
        if safe > self.sent:
            out.append(CallArgs(self.started.index, args[self.sent : safe]))
            self.sent = safe

    def _text(self, out: list, text: str, hold_ws: bool = False) -> None:
        """Content, with whitespace next to a call (and at either end) left out; text on both sides
        of a call is a line apart."""
        if not text:
            return
        text = self.ws + text
        core = text.rstrip()
        self.ws = text[len(core) :] if hold_ws else ""
        if self.after_call:
            core = core.lstrip()
        if core:
            out.append("\n" + core if self.after_call and self.shown else core)
            self.after_call, self.shown = False, True


class AnswerCalls:
    """Calls read out of both parts of an answer (a Thinking checkpoint's reasoning and the text
    after it) as their deltas come: a call made while reasoning is a call too. Content comes out as
    ``Delta``s of its part; the calls share one count."""

    def __init__(self) -> None:
        self.streams: dict[str, CallStream] = {}
        self.next = 0
        self.calls: list[ToolCall] = []
        self.content: dict[str, list[str]] = {"reasoning": [], "text": []}

    def push(self, delta: str) -> list:
        part = getattr(delta, "part", "text")
        return self._tag(part, self._stream(part).push(delta))

    def flush(self) -> list:
        return [x for part, s in self.streams.items() for x in self._tag(part, s.flush())]

    def _stream(self, part: str) -> CallStream:
        if part not in self.streams:
            self.streams[part] = CallStream()
        s = self.streams[part]
        s.index = max(s.index, self.next)
        return s

    def _tag(self, part: str, out: list) -> list:
        self.next = max(self.next, self.streams[part].index)
        tagged = []
        for x in out:
            if isinstance(x, str):
                self.content[part].append(x)
                x = Delta(x, part)
            elif isinstance(x, ToolCall):
                self.calls.append(x)
            tagged.append(x)
        return tagged

    def text(self, part: str = "text") -> str:
        return "".join(self.content[part])
