"""Thinking checkpoints: a template whose generation prompt opens <think> makes what comes before
</think> reasoning, apart from the answer, in results, streams and the conversation history."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import numpy as np
import pytest

from qwen3vl_onnx import Pipeline
from qwen3vl_onnx.demo.checkpoint import chat_template


@pytest.fixture(scope="module")
def thinking_bundle(tiny_one, tmp_path_factory):
    """The tiny bundle with its template's generation prompt opening <think>, as Qwen3-VL-*-Thinking's do."""
    d = tmp_path_factory.mktemp("thinking") / "bundle"
    shutil.copytree(tiny_one.bundle, d)
    tpl = chat_template().replace(
        "{{- '<|im_start|>assistant\\n' -}}\n{%- endif -%}", "{{- '<|im_start|>assistant\\n<think>\\n' -}}\n{%- endif -%}"
    )
    assert tpl != chat_template()
    (d / "chat_template.jinja").write_text(tpl)
    return d


def _scripted(pipe: Pipeline, text: str) -> None:
    """Make every sampler of ``pipe`` emit ``text``'s tokens, then the end-of-turn id."""
    ids = pipe.tokenizer.encode(text, add_special_tokens=False).ids + [pipe.tokenizer.token_to_id("<|im_end|>")]

    def sampler(*_, **__):
        it: Iterator[int] = iter(ids)
        return lambda logits: np.array([next(it)])

    pipe.sampler = sampler


def test_detected_from_the_template_not_the_name(tiny_one, thinking_bundle):
    assert Pipeline.from_bundle(thinking_bundle).thinking
    assert not Pipeline.from_bundle(tiny_one.bundle).thinking


def test_reasoning_and_answer_are_split_in_results_and_streams(thinking_bundle):
    pipe = Pipeline.from_bundle(thinking_bundle)
    _scripted(pipe, "Two shapes, one red.</think>\n\nA red circle.")
    stream = pipe.stream([{"role": "user", "content": "What is there?"}], max_new_tokens=40)
    deltas = list(stream)
    res = stream.result
    assert res.reasoning == "Two shapes, one red." and res.text == "A red circle." and res.finish_reason == "stop"
    assert "".join(d for d in deltas if d.part == "reasoning") == res.reasoning
    assert "".join(d for d in deltas if d.part == "text") == res.text
    first_text = next(i for i, d in enumerate(deltas) if d.part == "text" and d)
    assert all(d.part == "reasoning" for d in deltas[:first_text])  # reasoning first, then the answer
    assert res.to_dict()["reasoning"] == res.reasoning


def test_an_answer_cut_before_think_end_is_all_reasoning(thinking_bundle):
    pipe = Pipeline.from_bundle(thinking_bundle)
    _scripted(pipe, "Let me count them one by one.</think>\n\nThree.")
    res = pipe.generate([{"role": "user", "content": "How many?"}], max_new_tokens=3)
    first3 = pipe.tokenizer.decode(pipe.tokenizer.encode("Let me count", add_special_tokens=False).ids[:3])
    assert res.finish_reason == "length" and res.text == "" and res.reasoning == first3


def test_instruct_results_carry_no_reasoning(tiny_one):
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    stream = pipe.stream([{"role": "user", "content": "Hi"}], max_new_tokens=4, temperature=0, ignore_eos=True)
    assert all(d.part == "text" for d in stream)
    assert stream.result.reasoning is None and "reasoning" in stream.result.to_dict()


def test_a_thinking_conversation_keeps_reasoning_where_the_template_reads_it(thinking_bundle):
    pipe = Pipeline.from_bundle(thinking_bundle)
    conv = pipe.chat()
    _scripted(pipe, "Hmm.</think>\n\nYes.")
    assert conv.send("Is it red?").finish().text == "Yes."
    assert conv.messages[-1] == {"role": "assistant", "content": "Yes.", "reasoning_content": "Hmm."}
    _scripted(pipe, "Still.</think>\n\nNo.")
    res = conv.send("Is it blue?").finish()
    assert (res.text, res.reasoning) == ("No.", "Still.") and res.cached_tokens > 0
    json.dumps(conv.messages)  # the history is plain JSON, ready for /save


def test_generate_cli_prints_or_hides_reasoning(run_cli, thinking_bundle):
    """A random model never closes </think> in 6 tokens: all it writes is reasoning, which --json
    reports apart and --hide-reasoning leaves unprinted."""
    args = ("generate", thinking_bundle, "--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos")
    js = json.loads(run_cli(*args, "--json").stdout.strip().splitlines()[-1])
    assert js["reasoning"] and js["text"] == ""
    shown, hidden = run_cli(*args), run_cli(*args, "--hide-reasoning")
    assert shown.returncode == hidden.returncode == 0
    assert shown.stdout == js["reasoning"] + "\n" and hidden.stdout == "\n"
