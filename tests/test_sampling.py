"""runtime/sampling.py and text_stream.StopStrings: each piece on crafted logits and text, then
through the pipeline (stop strings while streaming, stop ids, log-probabilities, seeded runs)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from qwen3vl_onnx import Pipeline
from qwen3vl_onnx.errors import UserError
from qwen3vl_onnx.runtime.sampling import GenerationParams, make_logits_processor, make_sampler, token_logprob
from qwen3vl_onnx.runtime.text_stream import StopStrings


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    proc = make_logits_processor(repetition_penalty=2.0)
    z = proc(np.array([4.0, -4.0, 4.0, -4.0]), [0], [1])
    np.testing.assert_allclose(z, [2.0, -8.0, 4.0, -4.0])  # seen in prompt (0) and answer (1); 2, 3 untouched


def test_presence_and_frequency_penalties_count_the_answer_only():
    proc = make_logits_processor(presence_penalty=0.5, frequency_penalty=0.25)
    z = proc(np.zeros(4), [3, 3, 3], [1, 1, 2])
    np.testing.assert_allclose(z, [0.0, -1.0, -0.75, 0.0])  # 1: 0.5 + 2 * 0.25; 2: 0.5 + 0.25; prompt's 3: none


def test_logit_bias_and_nothing_to_do():
    np.testing.assert_allclose(make_logits_processor(logit_bias={2: -100.0, 0: 3.0})(np.ones(3), [], []), [4.0, 1.0, -99.0])
    assert make_logits_processor() is None


def test_min_p_keeps_tokens_near_the_likeliest():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(make_sampler(1.0, min_p=0.5, rng=np.random.default_rng(s))(logits)[0]) for s in range(300)}
    assert draws == {0, 1}  # 0.15 and 0.05 are under half of 0.5


def _reference_distribution(z: np.ndarray, temperature: float, top_p: float, top_k: int, min_p: float) -> np.ndarray:
    """What the sampler must draw from, written the plain way: whole-vocabulary sorts and masks."""
    z = z / temperature
    if top_k:
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p = np.where(p < min_p, 0.0, p)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    keep[order] = np.cumsum(p[order]) - p[order] < top_p
    p = np.where(keep, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("vocab,temperature,top_p,top_k,min_p,scale", [
    (151_936, 0.7, 0.8, 20, 0.0, 3.0),  # Qwen3-VL Instruct's defaults on Qwen's vocabulary, peaked logits
    (151_936, 1.0, 0.9, 0, 0.0, 6.0),   # no top-k: a 30-token nucleus found among the likeliest 64
    (4_000, 1.0, 0.95, 0, 0.0, 0.05),   # nearly flat logits: the nucleus holds most of the vocabulary
    (4_000, 1.0, 0.5, 0, 0.05, 1.0),    # min_p then top_p
    (4_000, 1.3, 1.0, 50, 0.0, 1.0),    # top-k alone
])  # fmt: skip
def test_sampler_draws_from_the_exact_distribution(vocab, temperature, top_p, top_k, min_p, scale):
    """6000 draws: each token's frequency within 5 standard errors of its exact probability (plus
    0.003), and no token drawn outside the allowed set."""
    z = np.random.default_rng(3).standard_normal(vocab) * scale
    want = _reference_distribution(z, temperature, top_p, top_k, min_p)
    sample = make_sampler(temperature, top_p, top_k, np.random.default_rng(4), min_p)
    draws = np.array([sample(z[None])[0] for _ in range(6000)])
    freq = np.bincount(draws, minlength=len(z)) / len(draws)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
    bound = 5 * np.sqrt(want * (1 - want) / len(draws)) + 0.003
    assert np.all(np.abs(freq - want) <= bound), np.max(np.abs(freq - want) - bound)


@pytest.mark.parametrize("scale", [0.01, 1.0, 4.0, 12.0])
def test_top_and_nucleus_equal_a_full_sort(scale):
    """The partial selections behind the sampler against whole-vocabulary sorts, ties included
    (logits rounded to a coarse grid), at every size the nucleus search passes through."""
    from qwen3vl_onnx.runtime.sampling import _nucleus, _top

    rng = np.random.default_rng(int(scale * 100))
    for vocab in (151_936, 3_000, 70):
        z = np.round(rng.standard_normal(vocab) * scale, 2)
        order = np.argsort(-z, kind="stable")
        for m in (1, 20, 64, 512, 4096, vocab):
            if m <= vocab:
                np.testing.assert_array_equal(z[_top(z, m)], z[order[:m]])
        p = np.exp(z - z.max())
        p /= p.sum()
        for top_p in (0.1, 0.8, 0.95, 0.999):
            ref = order[np.cumsum(p[order]) - p[order] < top_p]
            got = _nucleus(p, top_p)
            assert len(got) == len(ref) and np.allclose(np.sort(p[got]), np.sort(p[ref]), rtol=0, atol=0), (vocab, top_p)


def test_token_logprob_is_log_softmax_with_the_likeliest_alternatives():
    z = np.array([1.0, 3.0, 2.0, 0.0])
    lp = token_logprob(z, 2, 2)
    ref = z - np.log(np.exp(z).sum())
    assert lp.token == 2 and lp.logprob == pytest.approx(ref[2])
    assert [t for t, _ in lp.top] == [1, 2] and lp.top[0][1] == pytest.approx(ref[1])
    assert token_logprob(z, 0, 0).top == []
    big = (np.random.default_rng(5).standard_normal(151_936) * 3).astype(np.float32)  # the model's float32 logits
    ref = big.astype(np.float64) - big.max() - np.log(np.exp(big.astype(np.float64) - big.max()).sum())
    lp = token_logprob(big, 7, 5)
    assert [t for t, _ in lp.top] == list(np.argsort(-ref)[:5])
    assert abs(lp.logprob - ref[7]) < 1e-6 and max(abs(v - ref[t]) for t, v in lp.top) < 1e-6  # measured 1e-8


def test_stop_strings_split_over_pieces_are_never_shown():
    s = StopStrings(["</end>", "STOP"])
    shown = [s.push(p) for p in ["Hello </", "e", "nd> more"]]
    assert "".join(shown) == "Hello " and s.stopped and s.flush() == ""
    s = StopStrings(["STOP"])
    assert s.push("ST") == "" and s.push("ate") == "STate" and s.push(" S") == " " and s.flush() == "S"
    s = StopStrings(["ab", "b"])
    assert s.push("xab") == "x"  # the earliest match wins


@pytest.mark.parametrize("bad, message", [
    (dict(min_p=1.5), "min_p"), (dict(presence_penalty=3), "presence_penalty"), (dict(repetition_penalty=0), "repetition"),
    (dict(logit_bias={10**9: 1.0}), "logit_bias"), (dict(logit_bias={5: 500}), "logit_bias"), (dict(stop=("",)), "stop"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"), (dict(logprobs=21), "logprobs"), (dict(max_new_tokens=0), "max_new_tokens"),
])  # fmt: skip
def test_bad_parameters_are_one_line_errors(bad, message):
    with pytest.raises(UserError, match=message):
        GenerationParams(**bad).checked(151936)


@pytest.fixture(scope="module")
def pipe(tiny_one) -> Pipeline:
    return Pipeline.from_bundle(tiny_one.bundle)


def _scripted(pipe: Pipeline, text: str) -> list[int]:
    ids = pipe.tokenizer.encode(text, add_special_tokens=False).ids

    def sampler(*_, **__):
        it: Iterator[int] = iter(ids + [0] * 64)
        return lambda logits: np.array([next(it)])

    pipe.sampler = sampler
    return ids


def test_stop_strings_end_the_answer_while_streaming(tiny_one):
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    _scripted(pipe, "The answer is 42.\nUser: next question")
    stream = pipe.stream([{"role": "user", "content": "Q"}], max_new_tokens=40, stop=("\nUser:",))
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text == "The answer is 42." and stream.result.finish_reason == "stop"
    assert all("User" not in p for p in pieces)


def test_stop_token_ids_and_logprobs(tiny_one):
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    ids = _scripted(pipe, "one two three four")
    res = pipe.generate([{"role": "user", "content": "Q"}], max_new_tokens=10, stop_token_ids=(ids[2],), logprobs=3)
    assert res.token_ids == ids[:2] and res.finish_reason == "stop"
    assert [lp.token for lp in res.logprobs] == ids[:2] and all(len(lp.top) == 3 and lp.logprob <= 0 for lp in res.logprobs)


def test_seeded_sampling_repeats_and_penalties_change_the_answer(pipe):
    msgs = [{"role": "user", "content": "Tell me"}]
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, ignore_eos=True)
    a, b = pipe.generate(msgs, seed=3, **kw), pipe.generate(msgs, seed=3, **kw)
    assert a.token_ids == b.token_ids
    assert pipe.generate(msgs, seed=4, **kw).token_ids != a.token_ids
    greedy = pipe.generate(msgs, max_new_tokens=12, temperature=0, ignore_eos=True)
    banned = pipe.generate(msgs, max_new_tokens=12, temperature=0, ignore_eos=True, logit_bias={greedy.token_ids[0]: -100.0})
    assert banned.token_ids[0] != greedy.token_ids[0]
    fresh = pipe.generate(msgs, max_new_tokens=12, temperature=0, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0)
    assert len(set(fresh.token_ids)) >= len(set(greedy.token_ids))
