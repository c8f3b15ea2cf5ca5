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


FLAT_TOOLS = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]} for t in TOOLS]


def test_responses_api_with_tools_a_follow_up_and_a_stream(client, server):
    """/v1/responses through the openai client: text, function calls (valid), their output sent back
    with previous_response_id (the conversation comes from the server's memory and its cache), a
    typed event stream that adds up to the final response, a JSON-schema format."""
    r = client.responses.create(model="tiny", input="Say hello.", max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.output[0].type == "message" and r.output_text and r.usage.output_tokens == 5
    one = dict(tools=FLAT_TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, max_output_tokens=150)
    calls = client.responses.create(model="tiny", input="Weather in Paris?", extra_body={"seed": 2}, **one)
    assert calls.status == "completed" and [o.type for o in calls.output] == ["function_call"]
    fc = calls.output[0]
    jsonschema.validate(json.loads(fc.arguments), SCHEMAS[fc.name])
    result = [{"type": "function_call_output", "call_id": fc.call_id, "output": "21 C"}]
    follow = client.responses.create(model="tiny", previous_response_id=calls.id, tools=FLAT_TOOLS, max_output_tokens=4,
                                     input=result)  # fmt: skip
    assert follow.usage.input_tokens_details.cached_tokens >= calls.usage.input_tokens - 1  # the history, from the cache
    events, args = [], ""
    with client.responses.stream(model="tiny", input="Weather?", tools=FLAT_TOOLS, tool_choice="required", temperature=1.0,
                                 extra_body={"seed": 5}, parallel_tool_calls=False, max_output_tokens=150) as stream:  # fmt: skip
        for ev in stream:
            events.append(ev.type)
            if ev.type == "response.function_call_arguments.delta":
                args += ev.delta
        final = stream.get_final_response()
    assert events[:2] == ["response.created", "response.in_progress"] and events[-1] == "response.completed"
    assert "response.output_item.added" in events and args == final.output[0].arguments
    fmt = {"format": {"type": "json_schema", "name": "item", "schema": ITEM}}
    j = client.responses.create(model="tiny", input="Describe.", text=fmt, temperature=1.0, extra_body={"seed": 1},
                                max_output_tokens=150)  # fmt: skip
    jsonschema.validate(json.loads(j.output_text), ITEM)


def test_responses_api_refusals(server):
    h = {"Authorization": f"Bearer {server.api_key}"}
    for body, status, says in (
        ({"input": [{"type": "computer_call", "id": "x"}]}, 400, "item type 'computer_call' is not supported"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tool type 'web_search' is not supported"),
        ({"input": "hi", "previous_response_id": "resp_nope"}, 404, "is not among the last"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "part type 'input_audio'"),
    ):
        r = httpx.post(server.url + "/v1/responses", json=body, headers=h, timeout=60)
        assert r.status_code == status and says in r.json()["error"]["message"], r.text


def test_constrained_and_free_requests_decode_together(client):
    """Three requests at once (one slot each of the batch): a forced call, a schema answer and free
    text; each row keeps its own matcher, the free one none."""
    import concurrent.futures

    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM}}
    asks = [dict(tools=TOOLS, tool_choice="required"), dict(response_format=fmt), dict(extra_body={"ignore_eos": True})]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.chat.completions.create, model="tiny", messages=MSGS, temperature=1.0, seed=11,
                               max_tokens=150, **kw) for kw in asks]  # fmt: skip
        call, schema, free = (f.result() for f in futures)
    _check_calls(call.choices[0].message)
    jsonschema.validate(json.loads(schema.choices[0].message.content), ITEM)
    assert free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 150
