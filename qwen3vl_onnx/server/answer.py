"""An answer's text deltas as OpenAI shapes them: the deltas of ``chat.completion.chunk`` events
(content, ``reasoning_content``, ``tool_calls``) and the whole ``message`` at the end.

With tools offered, the calls are read out of the text as it comes (``runtime.tool_calls``): a
stream never shows a call's ``<tool_call>`` markup as content; it shows the call's id and name,
then its argument fragments, which add up to the whole answer's ``arguments``.
"""

from __future__ import annotations

from typing import Any

from ..runtime.tool_calls import AnswerCalls, CallArgs, CallStart, ToolCall


class Answer:
    """One choice's answer as it streams; ``message()`` and ``finish_reason()`` once it is done."""

    def __init__(self, tools: bool, thinking: bool):
        self.calls = AnswerCalls() if tools else None
        self.thinking = thinking
        self.said: dict[str, list[str]] = {"text": [], "reasoning": []}

    def push(self, delta: str) -> list[dict[str, Any]]:
        """The chunk deltas ``delta`` (a runtime ``Delta``: text of a part) makes."""
        return self._shape(self.calls.push(delta) if self.calls is not None else [delta])

    def flush(self) -> list[dict[str, Any]]:
        return self._shape(self.calls.flush()) if self.calls is not None else []

    def _shape(self, events: list) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for ev in events:
            if isinstance(ev, CallStart):
                out.append({"tool_calls": [{"index": ev.index, "id": ev.call.id, "type": "function",
                                            "function": {"name": ev.call.name, "arguments": ""}}]})  # fmt: skip
            elif isinstance(ev, CallArgs):
                if ev.text:
                    out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})
            elif isinstance(ev, str) and ev:
                part = getattr(ev, "part", "text")
                self.said[part].append(str(ev))
                out.append({"reasoning_content" if part == "reasoning" else "content": str(ev)})
        return out

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.calls.calls if self.calls is not None else []

    def message(self) -> dict[str, Any]:
        text = "".join(self.said["text"])
        msg: dict[str, Any] = {"role": "assistant", "content": None if self.tool_calls and not text else text,
                               "reasoning_content": "".join(self.said["reasoning"]) if self.thinking else None}  # fmt: skip
        if self.tool_calls:
            msg["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        return msg

    def finish_reason(self, reason: str) -> str:
        """OpenAI's ``tool_calls`` when the answer ended after calling; else the engine's reason."""
        return "tool_calls" if self.tool_calls and reason == "stop" else reason
