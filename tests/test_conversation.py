"""runtime/conversation.py: a chat that keeps its KV cache answers as a fresh call on the whole
history would, prefilling only what is new, and runs the vision tower once per picture."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_onnx import Pipeline
from qwen3vl_onnx.errors import UserError
from qwen3vl_onnx.runtime.conversation import reusable_prefix

from .conftest import picture

GREEDY = dict(max_new_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def pipe(tiny_one) -> Pipeline:
    return Pipeline.from_bundle(tiny_one.bundle)


def _parts(text: str, *images) -> list[dict]:
    return [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]


def test_turns_equal_fresh_calls_on_the_history_and_reuse_the_cache(pipe):
    """Three turns, images in the first two (one shown again in the third): each answer equals a
    stateless generate on the same history, token for token; later turns prefill only their new
    tokens; the repeated picture is not encoded again."""
    a, b = picture(64, 40, seed=1), picture(40, 96, seed=2)
    conv = pipe.chat(system="Be brief.")
    turns = [_parts("What is this?", a), _parts("And this one?", b), _parts("Same as the first?", a)]
    previous_prompt = 0
    for n, content in enumerate(turns):
        history = [*conv.messages, {"role": "user", "content": content}]
        stream = conv.send(content, **GREEDY)
        pieces = list(stream)
        res = stream.result
        fresh = pipe.generate(history, **GREEDY)
        assert res.token_ids == fresh.token_ids, n
        assert "".join(pieces) == res.text == conv.messages[-1]["content"]
        assert res.prompt_tokens == fresh.prompt_tokens
        if n:  # at least the whole previous prompt came from the cache
            assert res.cached_tokens >= previous_prompt
            assert res.cached_tokens < res.prompt_tokens
        else:
            assert res.cached_tokens == 0
        previous_prompt = res.prompt_tokens
    # a and b encoded once each; a shown again in turn 3 is a hit; pictures in the kept prefix are
    # not looked up at all (their keys and values are in the KV cache already)
    assert conv.vision.misses == 2 and conv.vision.hits == 1
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2


def test_a_replaced_picture_of_the_same_size_is_not_reused(pipe):
    """Equal pad tokens can stand for another picture: the cache is cut back to that picture."""
    pads = {pipe.config.image_token_id}
    img = pipe.config.image_token_id
    ids = [1, 2, img, img, img, 3, 4, img, img, 5]
    assert reusable_prefix(ids, ["x", "y"], ids + [6], ["x", "y"], pads) == len(ids)
    assert reusable_prefix(ids, ["x", "y"], ids + [6], ["x", "z"], pads) == 7  # the second picture differs
    assert reusable_prefix(ids, ["x", "y"], ids + [6], ["w", "y"], pads) == 2
    assert reusable_prefix(ids[:4], ["x"], ids, ["x", "y"], pads) == 2  # never split an image's pads
    assert reusable_prefix(ids, ["x", "y"], ids, ["x", "y"], pads) == len(ids) - 1  # one token left to run


def test_editing_history_recomputes_from_the_change(pipe):
    """A conversation whose earlier picture is swapped (same size) answers as a fresh call would."""
    conv = pipe.chat()
    list(conv.send(_parts("Look.", picture(64, 40, seed=1)), **GREEDY))
    conv.messages[0]["content"] = _parts("Look.", picture(64, 40, seed=9))
    history = [*conv.messages, {"role": "user", "content": "Again?"}]
    res = conv.send("Again?", **GREEDY).finish()
    assert res.token_ids == pipe.generate(history, **GREEDY).token_ids
    first_image = pipe.prepare(history).ids.index(pipe.config.image_token_id)
    assert res.cached_tokens <= first_image


def test_outgrowing_the_context_is_refused_or_drops_the_oldest_turns(tiny_one):
    pipe = Pipeline.from_bundle(tiny_one.bundle, context_length=70)
    conv = pipe.chat()
    list(conv.send("one " * 20, max_new_tokens=4, temperature=0, ignore_eos=True))
    with pytest.raises(UserError, match="conversation is .* tokens, the context holds 70 .*drop_oldest"):
        conv.send("two " * 40, max_new_tokens=4, temperature=0)
    assert len(conv.messages) == 2  # the refused turn left no trace
    res = conv.send("two " * 40, max_new_tokens=4, temperature=0, ignore_eos=True, drop_oldest=True).finish()
    assert res.completion_tokens >= 1
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] and "two" in conv.messages[0]["content"]


def test_reset_forgets_the_history_but_not_the_pictures(pipe):
    conv = pipe.chat()
    a = picture(64, 40, seed=3)
    first = conv.send(_parts("Hi", a), **GREEDY).finish()
    conv.reset()
    assert conv.messages == [] and conv.cache.length == 0
    again = conv.send(_parts("Hi", a), **GREEDY).finish()
    assert again.token_ids == first.token_ids and again.cached_tokens == 0
    assert conv.vision.misses == 1
    assert np.all(conv.cache.lengths > 0)


def test_a_portable_bundle_converses_too(tiny_one):
    """The portable graph's cache is the concatenated past: trimming and continuing work on it as well."""
    pipe = Pipeline.from_bundle(tiny_one.bundle_with(portable=True))
    conv = pipe.chat()
    for content in (_parts("What?", picture(64, 40, seed=1)), "More?"):
        history = [*conv.messages, {"role": "user", "content": content}]
        res = conv.send(content, **GREEDY).finish()
        assert res.token_ids == pipe.generate(history, **GREEDY).token_ids
    assert res.cached_tokens > 0


def test_an_answer_stopped_early_stays_in_the_history(pipe):
    """Closing a stream (Ctrl-C in the chat) keeps the question and the answer so far; the next turn
    answers as a fresh call on that history would."""
    conv = pipe.chat()
    stream = conv.send("Tell me a long story.", max_new_tokens=30, temperature=0, ignore_eos=True)
    it = iter(stream)
    shown = "".join(next(it) for _ in range(3))
    stream.close()
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] and conv.messages[1]["content"] == shown
    history = [*conv.messages, {"role": "user", "content": "Go on."}]
    res = conv.send("Go on.", **GREEDY).finish()
    assert res.token_ids == pipe.generate(history, **GREEDY).token_ids and res.cached_tokens > 0
