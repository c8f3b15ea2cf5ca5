"""Tool calls and structured outputs through ``serve`` with the official ``openai`` client, on random
weights (which never call a tool or write JSON on their own, so the grammar must): valid calls and
answers over several seeds at temperature 1, streamed deltas that add up to the whole answer, and
a tool-result turn prompted exactly as transformers renders it."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from .conftest import Server, picture, transformers_prompt_ids
from .test_constrain import ITEM, SCHEMAS, SEEDS, TOOLS
from .test_server_api import data_url

MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_one):
    s = Server(tiny_one.bundle, "--ctx-size", "1024", "--parallel", "2")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)


def _check_calls(message, names=("get_weather", "add")) -> None:
    assert message.tool_calls and message.content is None, message
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)
    for c in message.tool_calls:
        assert c.type == "function" and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("seed", SEEDS)
def test_required_and_named_calls_are_valid_whole_and_streamed(client, seed):
    for choice, names in (("required", ("get_weather", "add")), ({"type": "function", "function": {"name": "add"}}, ("add",))):
        kw = dict(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed, max_tokens=150)
        whole = client.chat.completions.create(**kw)
        assert whole.choices[0].finish_reason == "tool_calls"
        _check_calls(whole.choices[0].message, names)
        chunks = list(client.chat.completions.create(stream=True, **kw))
        calls: dict[int, dict] = {}
        for ch in chunks:
            for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
                c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert c["id"] is None and d.function.name  # the id and the name come first, once
                    c["id"], c["name"] = d.id, d.function.name
                else:
                    assert c["id"] is not None
                c["arguments"] += d.function.arguments or ""
            assert not (ch.choices and ch.choices[0].delta.content)  # no call markup as content
        want = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
        assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == want  # same seed, same call
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("seed", SEEDS)
def test_json_schema_answers_validate_and_json_object_parses(client, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=MSGS, response_format=fmt, temperature=1.0, seed=seed,
                                       max_tokens=150)  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), ITEM)
    brace = {"90": -100.0}  # '{' alone is banned: objects open with '{}' or '{"', which ends them sooner
    r = client.chat.completions.create(model="tiny", messages=MSGS, response_format={"type": "json_object"}, temperature=1.0,
                                       seed=seed, max_tokens=60, logit_bias=brace)  # fmt: skip
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


def test_a_tool_result_turn_is_prompted_as_transformers_renders_it(server, tiny_one):
    """The call passed back as the openai client sends it (arguments as a JSON string), two results,
    one with a picture: /tokenize gives transformers' ids for the same conversation and tools."""
    from transformers import AutoProcessor

    pic = picture(40, 56, seed=9)
    rome, one = '{"city": "Rome", "unit": "c"}', '{"a": 1, "b": true}'
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": rome}},
             {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": one}}]  # fmt: skip
    ours = [{"role": "system", "content": "Be brief."}, *MSGS, {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "image_url", "image_url": {"url": data_url(pic)}},
                                                                    {"type": "text", "text": "a chart"}]}]  # fmt: skip
    r = httpx.post(server.url + "/tokenize", headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60,
                   json={"messages": ours, "tools": TOOLS})  # fmt: skip
    assert r.status_code == 200, r.text
    as_objects = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}} for c in calls]
    theirs = [*ours[:2], {"role": "assistant", "content": "", "tool_calls": as_objects}, ours[3],
              {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "image", "image": pic},
                                                                      {"type": "text", "text": "a chart"}]}]  # fmt: skip
    processor = AutoProcessor.from_pretrained(str(tiny_one.checkpoint))
    ids = transformers_prompt_ids(processor, theirs, [], tools=TOOLS)
    assert r.json()["tokens"] == ids
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<tool_response>")) == 2


def test_no_model_means_the_served_one_and_tool_errors_are_400s(server):
    h = {"Authorization": f"Bearer {server.api_key}"}
    r = httpx.post(server.url + "/v1/chat/completions", headers=h, timeout=60, json={"messages": MSGS, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
    r = httpx.post(server.url + "/tokenize", headers=h, timeout=60, json={"messages": MSGS, "tools": [{"type": "function"}]})
    assert r.status_code == 400 and "tools[0] must be" in r.json()["error"]["message"], r.text
