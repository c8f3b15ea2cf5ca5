"""Tool calls read out of recorded model texts, whole and as deltas cut at every size: the content,
the calls and the streamed argument fragments agree, and nothing the model wrote is lost."""

from __future__ import annotations

import json
import random

import pytest

from qwen3vl_onnx.runtime.tool_calls import CallArgs, CallStart, CallStream, ToolCall, split_calls

CALL = '<tool_call>\n{{"name": "{}", "arguments": {}}}\n</tool_call>'
WEATHER = CALL.format("get_weather", '{"city": "Paris", "unit": "c"}')

RECORDED = [
    # (text, content, [(name, arguments)])
    (WEATHER, "", [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    ("Let me look that up.\n" + WEATHER, "Let me look that up.", [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    (WEATHER + "\n" + CALL.format("add", '{"a": 1, "b": 2}'), "",
     [("get_weather", '{"city": "Paris", "unit": "c"}'), ("add", '{"a": 1, "b": 2}')]),
    (CALL.format("say", '{"text": "a </tool_call> and <tool_call> inside"}'), "",
     [("say", '{"text": "a </tool_call> and <tool_call> inside"}')]),
    (CALL.format("brace", '{"s": "}}\\"}", "n": [1, {"k": "}"}]}'), "", [("brace", '{"s": "}}\\"}", "n": [1, {"k": "}"}]}')]),
    (CALL.format("unicode", '{"city": "Zürich 東京"}'), "", [("unicode", '{"city": "Zürich 東京"}')]),
    ("no call here, only <b>text</b>", "no call here, only <b>text</b>", []),
    ("broken <tool_call>\nthis is not JSON\n</tool_call> done", "broken <tool_call>\nthis is not JSON\n</tool_call> done", []),
    ('cut off <tool_call>\n{"name": "add", "arguments": {"a": 1', "cut off", [("add", '{"a": 1')]),
    ("cut before the name <tool_call>\n{\"na", "cut before the name", []),
    ('cut after the name <tool_call>\n{"name": "add", "', "cut after the name", [("add", "")]),
    ("  before  \n" + WEATHER + "\n\n  after  ", "before\nafter", [("get_weather", '{"city": "Paris", "unit": "c"}')]),
]  # fmt: skip


def _stream(text: str, pieces: list[int]) -> list:
    s, out, i = CallStream(), [], 0
    for n in pieces:
        out += s.push(text[i : i + n])
        i += n
    return out + s.push(text[i:]) + s.flush()


@pytest.mark.parametrize("text, content, calls", RECORDED, ids=range(len(RECORDED)))
def test_whole_and_streamed_agree(text, content, calls):
    got_content, got_calls = split_calls(text)
    assert got_content == content and [(c.name, c.arguments) for c in got_calls] == calls
    for c in got_calls:
        if text.count("</tool_call>") and c.arguments.endswith("}"):
            json.loads(c.arguments)  # a closed call's arguments are its JSON, exactly
    rng = random.Random(0)
    for cut in [[1] * len(text), [len(text)], *[[rng.randint(1, 9) for _ in range(len(text))] for _ in range(20)]]:
        out = _stream(text, cut)
        assert "".join(x for x in out if isinstance(x, str)) == content
        finished = [x for x in out if isinstance(x, ToolCall)]
        assert [(c.name, c.arguments) for c in finished] == calls
        starts = [x for x in out if isinstance(x, CallStart)]
        assert [s.index for s in starts] == list(range(len(calls))) and [s.call.id for s in starts] == [c.id for c in finished]
        for k, (_, args) in enumerate(calls):  # fragments arrive after their call's start and add up to its arguments
            assert "".join(x.text for x in out if isinstance(x, CallArgs) and x.index == k) == args
            first_fragment = next((i for i, x in enumerate(out) if isinstance(x, CallArgs) and x.index == k), None)
            assert first_fragment is None or first_fragment > out.index(starts[k])


def test_ids_are_unique_and_calls_serialise_as_openai_does():
    _, calls = split_calls(WEATHER + "\n" + WEATHER)
    assert len({c.id for c in calls}) == 2
    d = calls[0].to_dict()
    assert d["type"] == "function" and d["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}


def test_a_stream_shows_content_before_the_call_ends():
    """Content is handed out as it comes, and a call's name as soon as it is written."""
    s = CallStream()
    assert s.push("Checking the ") == ["Checking the"]  # the trailing space waits for what follows
    assert s.push("weather.\n<tool_call>\n") == [" weather."]
    out = s.push('{"name": "get_weather", "arguments": {"city": "Pa')
    assert isinstance(out[0], CallStart) and out[0].call.name == "get_weather"
    assert [x.text for x in out[1:]] == ['{"city": "Pa']


def test_calls_made_while_reasoning_and_after_it_are_both_calls():
    """A Thinking checkpoint's reasoning may call a tool before </think>, its answer after: both
    are calls (one count), neither leaves markup in reasoning_content or content."""
    from qwen3vl_onnx.runtime.text_stream import Delta
    from qwen3vl_onnx.runtime.tool_calls import AnswerCalls

    reasoning = "I should check.\n" + WEATHER + "\nNow the sum."
    answer = "Here: " + CALL.format("add", '{"a": 1, "b": 2}')
    a = AnswerCalls()
    events = []
    for text, part in ((reasoning, "reasoning"), (answer, "text")):
        for k in range(0, len(text), 5):
            events += a.push(Delta(text[k : k + 5], part))
    events += a.flush()
    want = [("get_weather", '{"city": "Paris", "unit": "c"}'), ("add", '{"a": 1, "b": 2}')]
    assert [(c.name, c.arguments) for c in a.calls] == want
    assert [s.index for s in events if isinstance(s, CallStart)] == [0, 1]
    assert a.text("reasoning") == "I should check.\nNow the sum." and a.text() == "Here:"
    assert all(x.part == "reasoning" for x in events if isinstance(x, str) and "check" in x)
