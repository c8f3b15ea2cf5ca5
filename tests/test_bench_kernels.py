"""``bench --kernels``: the decode attention it times computes attention over the cache it binds."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_onnx.bench.kernels import DecodeAttention, kernels_markdown, measure_attention, measure_case, measure_chain


def _reference(a: DecodeAttention, layer: int, q_heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """softmax(q K^T / sqrt(d)) V over the cached positions and the new tokens (each new token sees
    those before it and itself), each query head reading its group's kv head (numpy, float64)."""
    rows, new = a.q.shape[:2]
    out = np.zeros((rows, new, q_heads, head_dim))
    for b in range(rows):
        for h in range(q_heads):
            kv = h // (q_heads // kv_heads)
            cols = slice(kv * head_dim, (kv + 1) * head_dim)
            keys = np.concatenate([a.keys[layer][b, kv, : a.cached], a.k[b, :, cols]])
            values = np.concatenate([a.values[layer][b, kv, : a.cached], a.v[b, :, cols]])
            for j in range(new):
                seen = a.cached + j + 1
                s = keys[:seen].astype(np.float64) @ a.q[b, j, h * head_dim : (h + 1) * head_dim] / np.sqrt(head_dim)
                p = np.exp(s - s.max())
                out[b, j, h] = (p / p.sum()) @ values[:seen]
    return out.reshape(rows, new, q_heads * head_dim)


def test_decode_attention_reads_each_rows_cache_and_writes_the_new_token_in_place():
    q_heads, kv_heads, head_dim, layers = 8, 2, 16, 2
    a = DecodeAttention(rows=3, cached=37, q_heads=q_heads, layers=layers, kv_heads=kv_heads, head_dim=head_dim)
    ref = sum(_reference(a, i, q_heads, kv_heads, head_dim) for i in range(layers))
    before = [k.copy() for k in a.keys]
    out = a.run()
    # float32 kernel against a float64 sum over 38 positions of two layers: |diff| measured 1.5e-7 (outputs ~1)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    k_new = a.k.reshape(3, kv_heads, head_dim)
    for i in range(layers):
        np.testing.assert_array_equal(a.keys[i][:, :, 37], k_new)  # the buffer itself is the present
        np.testing.assert_array_equal(a.keys[i][:, :, :37], before[i][:, :, :37])


@pytest.mark.parametrize(("cache", "new"), [("PER_CHANNEL", 1), ("PER_TENSOR", 1), ("PER_TENSOR", 3), ("fp32", 3)])
def test_attention_over_each_cache_form(cache, new):
    """The int8 forms time attention over their codes times their scales, the new tokens written
    quantized into the bound buffer; a prompt chunk's tokens see the cache and each other causally."""
    q_heads, kv_heads, head_dim, layers, cached = 8, 2, 16, 2, 37
    rows = 2 if new == 1 else 1  # ONNX Runtime takes a prompt chunk over a past one row at a time
    a = DecodeAttention(rows=rows, cached=cached, q_heads=q_heads, layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                        cache=cache, new=new)  # fmt: skip
    item = 1 if cache != "fp32" else 4
    assert a.bytes_read == 2 * layers * rows * kv_heads * (cached + new) * head_dim * item
    if cache == "PER_TENSOR":
        assert np.unique(a.scales).size == 1
    out = a.run()
    assert out.shape == (rows, new, q_heads * head_dim)
    if cache != "fp32":
        s = a.scales[None, :, None, :]
        k_new = a.k.reshape(rows, new, kv_heads, head_dim).transpose(0, 2, 1, 3)
        written = a.keys[0][:, :, cached : cached + new]
        np.testing.assert_array_equal(written, np.clip(np.rint(k_new / s), -128, 127))
        for i in range(1, layers):  # every layer got the same new tokens
            np.testing.assert_array_equal(a.keys[i][:, :, cached : cached + new], written)
        for i in range(layers):  # the float reference over the dequantized cache, new tokens included
            a.keys[i], a.values[i] = a.keys[i] * s, a.values[i] * s
        a.k = a.keys[0][:, :, cached : cached + new].transpose(0, 2, 1, 3).reshape(rows, new, -1)
        a.v = a.values[0][:, :, cached : cached + new].transpose(0, 2, 1, 3).reshape(rows, new, -1)
    ref = sum(_reference(a, i, q_heads, kv_heads, head_dim) for i in range(layers))
    # float32 kernels against float64: |diff| measured below 1e-6 (outputs ~1)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_kernel_figures_and_their_table():
    r = measure_attention(rows=2, cached=100, q_heads=8, repeats=1, layers=2)
    assert r["ms_per_step"] > 0 and r["cache_gb_s"] > 0
    gops = measure_case("nbits4", 4, 256, 128, repeats=1)
    assert gops > 0
    row = {"case": "decode attention", "rows": 2, "cached": 100, "q_heads": 8, **r}
    chain = measure_chain((1, 4), repeats=1, k=128, layers=3)
    assert [c["m"] for c in chain] == [1, 4] and all(c["ms"] > 0 for c in chain)
    machine = {"cpu": "c", "cores": 2, "onnxruntime": "x"}
    table = kernels_markdown([{"case": "k", "m": 4, "k": 256, "n": 128, "gops": gops}], machine, [row], chain)
    assert "| k | 4 x 256 x 128 |" in table and "| decode attention (2 layers) | 1 | 100 |" in table
    assert "3 chained 128 x 128 MatMulNBits int4" in table and "| M = 1 |" in table and "| 1.00x |" in table
