"""Constrained decoding on random weights, which never answer in JSON or call a tool on their own: the
grammar has to, at temperature 1 over several seeds. Every answer that ends validates (a violation
is a bug, not a tolerance); special tokens pushed by +100 logit biases never get into the JSON."""

from __future__ import annotations

import json

import jsonschema
import pytest

from qwen3vl_onnx import Pipeline
from qwen3vl_onnx.errors import UserError

MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}  # fmt: skip
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99}, "b": {"type": "boolean"}},
       "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ITEM = {"type": "object", "additionalProperties": False, "required": ["kind", "count", "ok", "tags"],
        "properties": {"kind": {"enum": ["circle", "square"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9},
                       "ok": {"type": "boolean"}, "tags": {"type": "array", "maxItems": 2,
                                                            "items": {"type": "string", "maxLength": 6}}}}  # fmt: skip
SEEDS = range(4)


@pytest.fixture(scope="module")
def pipe(tiny_one) -> Pipeline:
    return Pipeline.from_bundle(tiny_one.bundle)


def _valid_calls(res, names=("get_weather", "add")) -> None:
    assert res.tool_calls and res.finish_reason == "tool_calls", (res.finish_reason, res.text, res.tool_calls)
    for call in res.tool_calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("seed", SEEDS)
def test_required_and_named_tool_choices_always_call(pipe, seed):
    _valid_calls(pipe.generate(MSGS, tools=TOOLS, tool_choice="required", max_new_tokens=120, temperature=1.0, seed=seed))
    named = {"type": "function", "function": {"name": "add"}}
    res = pipe.generate(MSGS, tools=TOOLS, tool_choice=named, max_new_tokens=120, temperature=1.0, seed=seed)
    _valid_calls(res, names=("add",))
    assert len(res.tool_calls) == 1 and res.text == ""
    one = pipe.generate(MSGS, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_new_tokens=120,
                        temperature=1.0, seed=seed)  # fmt: skip
    _valid_calls(one)
    assert len(one.tool_calls) == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_json_schema_answers_validate(pipe, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM, "strict": True}}
    res = pipe.generate(MSGS, response_format=fmt, max_new_tokens=120, temperature=1.0, seed=seed)
    assert res.finish_reason == "stop", res.text
    jsonschema.validate(json.loads(res.text), ITEM)


def test_json_object_parses_and_specials_never_enter_it(pipe):
    """+100 on <|im_start|>, <|image_pad|>, <think> and <tool_call> would have them everywhere, but
    the grammar keeps them out; every object that ends parses (+30 on '{}' makes some end at once)."""
    tk = pipe.tokenizer
    pushed = {tk.token_to_id(t): 100.0 for t in ("<|im_start|>", "<|image_pad|>", "<think>", "<tool_call>")}
    ended = 0
    for seed in SEEDS:
        for extra in ({}, {tk.token_to_id("{}"): 30.0}):
            res = pipe.generate(MSGS, response_format={"type": "json_object"}, logit_bias={**pushed, **extra},
                                max_new_tokens=60, temperature=1.0, seed=seed)  # fmt: skip
            assert res.text.startswith("{") and not set(pushed) & set(res.token_ids), res.text
            if res.finish_reason == "stop":
                ended += 1
                assert isinstance(json.loads(res.text), dict), res.text
    assert ended >= len(SEEDS)
    with_specials = pipe.generate(MSGS, logit_bias=pushed, max_new_tokens=3, temperature=1.0, seed=0)
    assert set(with_specials.token_ids) <= set(pushed)  # unconstrained, the biases win: the test above means something


def test_auto_holds_a_call_once_the_model_opens_one_and_none_never_calls(pipe):
    """Random weights never open a call; +100 on <tool_call> makes them: under ``auto`` every call
    so opened is a valid call of a listed function (the last may be cut by max_tokens)."""
    bias = {pipe.tokenizer.token_to_id("<tool_call>"): 100.0}
    for seed in SEEDS:
        res = pipe.generate(MSGS, tools=TOOLS, logit_bias=bias, max_new_tokens=90, temperature=1.0, seed=seed)
        closed = res.tool_calls if res.finish_reason != "length" else res.tool_calls[:-1]
        assert closed and "<tool_call>" not in res.text, res
        for call in closed:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        none = pipe.generate(MSGS, tools=TOOLS, tool_choice="none", logit_bias=bias, max_new_tokens=10, temperature=1.0,
                             seed=seed)  # fmt: skip
        assert none.tool_calls == [] and pipe.tokenizer.token_to_id("<tool_call>") not in none.token_ids
    free = pipe.generate(MSGS, tools=TOOLS, max_new_tokens=10, temperature=1.0, seed=0)
    assert free.tool_calls == [] and free.finish_reason == "length"  # nothing forced when the model does not call


def test_streamed_content_equals_the_result(pipe):
    bias = {pipe.tokenizer.token_to_id("<tool_call>"): 4.0}  # some seeds call, some write text first
    for seed in SEEDS:
        stream = pipe.stream(MSGS, tools=TOOLS, logit_bias=bias, max_new_tokens=60, temperature=1.0, seed=seed)
        text = "".join(stream)
        assert text == stream.result.text and "<tool_call>" not in text


def test_thinking_checkpoints_are_held_only_after_think(pipe, tiny_one, tmp_path):
    """A Thinking template: the reasoning is free, the answer after </think> follows the schema."""
    import shutil

    from qwen3vl_onnx.demo.checkpoint import chat_template

    bundle = shutil.copytree(tiny_one.bundle, tmp_path / "thinking")
    tpl = chat_template().replace("{{- '<|im_start|>assistant\\n' -}}", "{{- '<|im_start|>assistant\\n<think>\\n' -}}")
    (bundle / "chat_template.jinja").write_text(tpl)
    thinking = Pipeline.from_bundle(bundle)
    think_end = thinking.tokenizer.token_to_id("</think>")
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM}}
    for seed in SEEDS[:3]:
        res = thinking.generate(MSGS, response_format=fmt, logit_bias={think_end: 100.0}, max_new_tokens=120, temperature=1.0,
                                seed=seed)  # fmt: skip
        assert res.token_ids[0] == think_end and res.reasoning == ""  # the bias closes the reasoning at once
        jsonschema.validate(json.loads(res.text), ITEM)  # then the grammar, which keeps </think> out of the JSON
        free = thinking.generate(MSGS, response_format=fmt, max_new_tokens=8, temperature=1.0, seed=seed)
        assert free.reasoning and not free.text  # no </think>: nothing was held


@pytest.mark.parametrize("kwargs, says", [
    ({"tools": "get_weather"}, "tools must be a list"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name must be"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"response_format": {"type": "json_schema"}}, "json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format type 'yaml'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "minProperties": "x"}}}},
     "response_format schema"),
    ({"response_format": {"type": "regex", "regex": "(unclosed"}}, "response_format regex"),
])  # fmt: skip
def test_bad_specs_are_one_line_errors(pipe, kwargs, says):
    with pytest.raises(UserError, match=says.replace("[", r"\[").replace("(", r"\(")):
        pipe.generate(MSGS, max_new_tokens=2, **kwargs)


def test_a_template_without_tools_is_refused(pipe, tiny_one, tmp_path):
    import shutil

    bundle = shutil.copytree(tiny_one.bundle, tmp_path / "plain")
    (bundle / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                                "{% endfor %}<|im_start|>assistant\n")  # fmt: skip
    with pytest.raises(UserError, match="chat template does not render tools"):
        Pipeline.from_bundle(bundle).generate(MSGS, tools=TOOLS, max_new_tokens=2)


def test_a_conversation_keeps_tool_turns(pipe):
    """A call, its result (with a picture), the answer after it: each turn's prompt is the history's."""
    from .conftest import picture

    chat = pipe.chat()
    first = chat.send("Weather in Paris?", tools=TOOLS, tool_choice="required", max_new_tokens=80, temperature=1.0,
                      seed=1).finish()  # fmt: skip
    assert first.tool_calls and chat.messages[-1]["tool_calls"][0]["id"] == first.tool_calls[0].id
    results = [[{"type": "image", "image": picture(40, 40)}, {"type": "text", "text": "sunny"}]] * len(first.tool_calls)
    second = chat.reply_to_calls(results, tools=TOOLS, max_new_tokens=5, temperature=0, ignore_eos=True).finish()
    assert second.cached_tokens >= first.prompt_tokens  # the first turn came from the cache
    fresh = pipe.generate(chat.messages[:-1], tools=TOOLS, max_new_tokens=5, temperature=0, ignore_eos=True)
    assert second.token_ids == fresh.token_ids
    with pytest.raises(UserError, match="made 0 tool call"):
        chat.reply_to_calls(["x"], tools=TOOLS)
