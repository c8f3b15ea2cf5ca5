"""Cached decoding must equal one full forward: the invariant the whole generation loop rests on."""

from __future__ import annotations

import numpy as np

from qwen3vl_onnx import Pipeline
from qwen3vl_onnx.runtime.cache import KVCache
from qwen3vl_onnx.runtime.positions import rope_index

from .conftest import picture


def assert_token_by_token_equals_full_forward(bundle, extra: list[int]) -> None:
    """A prompt with a picture prefilled, then ``extra`` fed one token at a time, gives the logits of
    one forward over everything (dense and MoE tests share it)."""
    pipe = Pipeline.from_bundle(bundle)
    m, cfg = pipe.model, pipe.config
    msgs = [{"role": "user", "content": [{"type": "image", "image": picture(64, 96)}, {"type": "text", "text": "Hi there"}]}]
    prompt = pipe.prepare(msgs)
    emb, ds = m.encode_images(prompt.pixel_values, prompt.grids)
    pos, _ = rope_index(prompt.ids, cfg.image_token_id, cfg.video_token_id, prompt.grids)
    ids = prompt.ids + extra
    n = len(prompt.ids)
    full_pos = np.concatenate([pos, pos[:, -1:] + 1 + np.arange(len(extra))], axis=1)

    embeds, vis, dsf = m.prefill_inputs(ids, emb, ds)
    full = m.forward(embeds, full_pos[:, None, :], m.new_cache(), vis, dsf, logits_to_keep=len(ids))[0]

    # Prefill the prompt (the image straddles nothing: chunk at the text boundary), then one token at a time.
    cache = m.new_cache()
    p_embeds, p_vis, p_ds = m.prefill_inputs(prompt.ids, emb, ds)
    step_logits = [m.forward(p_embeds, pos[:, None, :], cache, p_vis, p_ds, logits_to_keep=n)[0]]
    for j, tok in enumerate(extra):
        step_logits.append(m.forward(m.embed([tok])[None], full_pos[:, None, n + j : n + j + 1], cache)[0])
    assert cache.length == len(ids)
    np.testing.assert_allclose(np.concatenate(step_logits), full, atol=1e-4, rtol=0)


def test_token_by_token_equals_full_forward(tiny_one):
    assert_token_by_token_equals_full_forward(tiny_one.bundle, [11, 22, 33, 44, 55])


def test_text_only_each_token(tiny_one):
    m = Pipeline.from_bundle(tiny_one.bundle).model
    ids = [9707, 11, 1879, 0, 151645, 198, 42]
    pos, _ = rope_index(ids, 151655, 151656)
    full = m.forward(m.embed(ids)[None], pos[:, None, :], m.new_cache(), logits_to_keep=len(ids))[0]
    cache = m.new_cache()
    steps = [m.forward(m.embed([t])[None], pos[:, None, i : i + 1], cache)[0] for i, t in enumerate(ids)]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4, rtol=0)
    # logits_to_keep=1 returns exactly the last row of the full forward
    last = m.forward(m.embed(ids)[None], pos[:, None, :], m.new_cache(), logits_to_keep=1)[0]
    np.testing.assert_allclose(last[0], full[-1], atol=1e-5, rtol=0)


def test_cache_grows_without_losing_state(tiny_one):
    """A cache smaller than the prompt is grown (by copying once), and results do not change."""
    m = Pipeline.from_bundle(tiny_one.bundle).model
    ids = list(range(1000, 1300))  # 300 tokens > the 256-slot starting buffer
    pos, _ = rope_index(ids, 151655, 151656)
    full = m.forward(m.embed(ids)[None], pos[:, None, :], m.new_cache(capacity=len(ids)), logits_to_keep=1)
    small = m.new_cache(capacity=16)
    part = m.forward(m.embed(ids[:200])[None], pos[:, None, :200], small, logits_to_keep=1)
    assert small.length == 200
    out = [m.forward(m.embed([t])[None], pos[:, None, 200 + j : 201 + j], small) for j, t in enumerate(ids[200:])]
    assert small.length == 300 and small.keys[0].shape[2] >= 300
    assert part.shape == (1, 1, 151936)
    np.testing.assert_allclose(out[-1], full, atol=1e-4, rtol=0)


def test_prefill_graph_continues_a_cache(int8_bundle):
    """A --prefill-int8 bundle: a prompt in two chunks of >= 8 tokens (the second attends to the first
    through the shared cache, as a second chat turn does) equals the whole prompt in one call, and
    decoding continues from it. Per-row activation quantization does not depend on how the rows are
    chunked, so the match is float-exact up to summation order (1e-4), not a quantization tolerance."""
    m = Pipeline.from_bundle(int8_bundle).model
    ids = list(range(2000, 2032))
    pos, _ = rope_index(ids, 151655, 151656)
    full_cache = m.new_cache()
    full = m.forward(m.embed(ids)[None], pos[:, None, :], full_cache, logits_to_keep=12)[0]
    cache = m.new_cache()
    m.forward(m.embed(ids[:20])[None], pos[:, None, :20], cache, logits_to_keep=1)
    second = m.forward(m.embed(ids[20:])[None], pos[:, None, 20:], cache, logits_to_keep=12)[0]
    np.testing.assert_allclose(second, full, atol=1e-4, rtol=0)
    np.testing.assert_allclose(m.step([7], cache), m.step([7], full_cache), atol=1e-4, rtol=0)


def test_prefault_keeps_what_the_cache_holds():
    """Mapping every page ahead (the server does it at load) must not change a value."""
    cache = KVCache.empty(layers=2, batch=3, kv_heads=2, head_dim=8, capacity=700, fused=True)
    cache.ensure(700)
    rng = np.random.default_rng(0)
    for a in (*cache.keys, *cache.values):
        a[...] = rng.standard_normal(a.shape, dtype=np.float32)
    before = [a.copy() for a in (*cache.keys, *cache.values)]
    cache.prefault()
    for a, b in zip((*cache.keys, *cache.values), before, strict=True):
        np.testing.assert_array_equal(a, b)
