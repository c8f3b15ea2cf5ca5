"""runtime/generate.py, cache.py and sampling.py: batched decoding equals single runs, the cache's
rows, trim and continuation, and the vectorised sampler."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_onnx import Pipeline
from qwen3vl_onnx.runtime.generate import batch_generate_step, generate_step
from qwen3vl_onnx.runtime.positions import rope_index
from qwen3vl_onnx.runtime.sampling import make_sampler

from .conftest import picture

GREEDY = make_sampler(0.0)


def _single(m, ids, n, image=None):
    cache = m.new_cache(capacity=len(ids) + n)
    emb = ds = None
    if image is not None:
        emb, ds = m.encode_images(image.pixel_values, image.grids)
    grids = image.grids if image is not None else ()
    return [t for t, _ in generate_step(m, ids, cache, GREEDY, n, emb, ds, grids)]


@pytest.fixture(scope="module")
def pipe(tiny_one) -> Pipeline:
    return Pipeline.from_bundle(tiny_one.bundle)


def test_batched_greedy_decode_equals_single_runs(pipe):
    """Right-padded prompts of different lengths in one batch (per-row seqlens_k) give each row's
    single-run tokens, token for token."""
    m = pipe.model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (5, 17, 11)]
    n = 12
    batched = np.stack(list(batch_generate_step(m, prompts, m.new_cache(batch=3, capacity=40), GREEDY, n)), axis=1)
    for b, p in enumerate(prompts):
        assert batched[b].tolist() == _single(m, p, n), b


def test_prompts_prefilled_into_slots_then_decoded_together(pipe):
    """The server's pattern: each prompt (with or without an image) is prefilled alone into its row
    of one preallocated cache, then all rows decode in one call per step, each at its own length
    and MRoPE offset."""
    m = pipe.model
    msgs = [
        [{"role": "user", "content": [{"type": "image", "image": picture(64, 40)}, {"type": "text", "text": "What?"}]}],
        [{"role": "user", "content": "Tell me a long story about shapes."}],
        [{"role": "user", "content": [{"type": "image", "image": picture(32, 96, seed=3)}, {"type": "text", "text": "Hm"}]}],
    ]
    prompts = [pipe.prepare(x) for x in msgs]
    n = 10
    cache = m.new_cache(batch=3, capacity=max(len(p.ids) for p in prompts) + n)
    last = []
    for b, p in enumerate(prompts):
        emb, ds = m.encode_images(p.pixel_values, p.grids) if p.pixel_values is not None else (None, None)
        last.append(m.prefill(p.ids, emb, ds, p.grids, cache.row(b))[0, -1])
    assert cache.lengths.tolist() == [len(p.ids) for p in prompts]
    assert cache.rope_deltas[0] < 0 and cache.rope_deltas[1] == 0  # images compress positions
    tokens = GREEDY(np.stack(last))
    out = [tokens]
    for _ in range(n - 1):
        tokens = GREEDY(m.step(tokens, cache))
        out.append(tokens)
    out = np.stack(out, axis=1)
    for b, p in enumerate(prompts):
        assert out[b].tolist() == _single(m, p.ids, n, p if p.pixel_values is not None else None), b


def test_continuing_a_cache_equals_one_prefill_and_trim_is_undo(pipe):
    """A prompt with an image prefilled in two parts (positions continue at the cache's next
    position, its MRoPE delta carried) gives the one-call logits; trimming the second part and
    prefilling it again gives them once more."""
    m = pipe.model
    content = [{"type": "image", "image": picture(64, 40)}, {"type": "text", "text": "Say"}]
    p = pipe.prepare([{"role": "user", "content": content}])
    emb, ds = m.encode_images(p.pixel_values, p.grids)
    whole = m.prefill(p.ids, emb, ds, p.grids, m.new_cache(), logits_to_keep=1)[0, -1]
    cut = p.ids.index(pipe.config.vision_end_token_id) + 1  # the image and its markers in the first part
    cache = m.new_cache()
    m.prefill(p.ids[:cut], emb, ds, p.grids, cache)
    tail = p.ids[cut:]
    first = m.prefill(tail, None, None, (), cache)[0, -1]
    np.testing.assert_allclose(first, whole, atol=1e-4, rtol=0)
    cache.trim(len(tail))
    assert cache.length == cut
    again = m.prefill(tail, None, None, (), cache)[0, -1]
    np.testing.assert_allclose(again, whole, atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        cache.trim(cache.length + 1)


def test_rope_index_start_continues_positions():
    ids = [1, 2, 9, 9, 9, 9, 3, 4]  # 9: image pads of one 1x4x4 grid (2x2 merged)
    full, delta = rope_index(ids, 9, 8, [(1, 4, 4)])
    head, d1 = rope_index(ids[:6], 9, 8, [(1, 4, 4)])
    tail, d2 = rope_index(ids[6:], 9, 8, start=6 + d1)
    np.testing.assert_array_equal(np.concatenate([head, tail], axis=1), full)
    assert d1 + d2 == delta and full[0, -1] + 1 == len(ids) + delta


def test_sampler_rows_are_independent_and_limits_hold():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)) * 3
    np.testing.assert_array_equal(GREEDY(logits), logits.argmax(axis=1))
    np.testing.assert_array_equal(make_sampler(1.0, top_k=1)(logits), logits.argmax(axis=1))
    np.testing.assert_array_equal(make_sampler(1.0, top_p=1e-6)(logits), logits.argmax(axis=1))
    # the three likeliest by value (not argsort: under QEMU's AVX2 emulation numpy's argsort misorders)
    third = np.sort(logits, axis=1)[:, -3]
    draws = np.stack([make_sampler(2.0, top_k=3, rng=np.random.default_rng(s))(logits) for s in range(200)])
    for b in range(4):
        assert set(draws[:, b].tolist()) == set(np.flatnonzero(logits[b] >= third[b]).tolist())  # all three, nothing else
    a = make_sampler(0.7, top_p=0.9, rng=np.random.default_rng(5))(logits)
    b = make_sampler(0.7, top_p=0.9, rng=np.random.default_rng(5))(logits)
    np.testing.assert_array_equal(a, b)  # a seed repeats


def test_sampler_follows_the_distribution():
    """At temperature 1 the draws follow softmax(logits) (chi-square-sized tolerance, 4000 draws)."""
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    s = make_sampler(1.0, rng=np.random.default_rng(1))
    counts = np.bincount([int(s(logits)[0]) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_long_prompts_prefill_in_chunks_with_the_same_logits(pipe, monkeypatch):
    """Chunks of 5 tokens, cutting through both images' pads (their features and DeepStack rows
    split between calls), give the one-call logits at every position; asking for the last few
    positions' logits returns just those."""
    from qwen3vl_onnx.runtime import model as model_module

    m = pipe.model
    content = [{"type": "image", "image": picture(64, 40)}, {"type": "image", "image": picture(40, 72, seed=2)},
               {"type": "text", "text": "Compare the two."}]  # fmt: skip
    p = pipe.prepare([{"role": "user", "content": content}])
    emb, ds = m.encode_images(p.pixel_values, p.grids)
    whole = m.prefill(p.ids, emb, ds, p.grids, m.new_cache(), logits_to_keep=len(p.ids))[0]
    monkeypatch.setattr(model_module, "PREFILL_MIN_CHUNK", 5)
    monkeypatch.setattr(model_module, "PREFILL_SCORES_BYTES", 1)
    assert m.prefill_chunk(len(p.ids)) == 5 and len(p.ids) > 5 * 5
    chunked = m.prefill(p.ids, emb, ds, p.grids, m.new_cache(), logits_to_keep=len(p.ids))[0]
    np.testing.assert_allclose(chunked, whole, atol=1e-4, rtol=0)
    last = m.prefill(p.ids, emb, ds, p.grids, m.new_cache(), logits_to_keep=10)[0]
    np.testing.assert_allclose(last, whole[-10:], atol=1e-4, rtol=0)


def test_vision_calls_split_long_runs_between_frames(pipe, monkeypatch):
    from qwen3vl_onnx.runtime import model as model_module
    from qwen3vl_onnx.runtime.vision_geometry import vision_calls

    grids = [(1, 4, 4), (3, 4, 4), (1, 2, 8), (2, 6, 4)]
    assert vision_calls(grids, 32) == [[(1, 4, 4), (1, 4, 4)], [(2, 4, 4)], [(1, 2, 8)], [(1, 6, 4)], [(1, 6, 4)]]
    assert vision_calls(grids, 10**6) == [[(1, 4, 4), (3, 4, 4), (1, 2, 8)], [(2, 6, 4)]]
    pv = np.random.default_rng(0).standard_normal((sum(t * h * w for t, h, w in grids), 1536), dtype=np.float32)
    emb, ds = pipe.model.encode_images(pv, grids)
    monkeypatch.setattr(model_module, "VISION_MAX_PATCHES", 32)
    emb2, ds2 = pipe.model.encode_images(pv, grids)
    np.testing.assert_allclose(emb2, emb, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ds2, ds, atol=1e-5, rtol=0)
