"""``bench --kernels``: the decode attention it times computes attention over the cache it binds."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_onnx.bench.kernels import DecodeAttention, kernels_markdown, measure_attention, measure_case, measure_chain


def _reference(a: DecodeAttention, layer: int, q_heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """softmax(q K^T / sqrt(d)) V over the cached positions and the new token, each query head
    reading its group's kv head (numpy, float64)."""
    rows, n = a.q.shape[0], a.cached + 1
    out = np.zeros((rows, q_heads, head_dim))
    for b in range(rows):
        for h in range(q_heads):
            kv = h // (q_heads // kv_heads)
            keys = np.concatenate([a.keys[layer][b, kv, : a.cached], a.k[b, 0, kv * head_dim : (kv + 1) * head_dim][None]])
            values = np.concatenate([a.values[layer][b, kv, : a.cached], a.v[b, 0, kv * head_dim : (kv + 1) * head_dim][None]])
            s = keys.astype(np.float64) @ a.q[b, 0, h * head_dim : (h + 1) * head_dim] / np.sqrt(head_dim)
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ values
    assert keys.shape[0] == n
    return out.reshape(rows, 1, q_heads * head_dim)


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


@pytest.mark.parametrize("cache", ["PER_CHANNEL", "PER_TENSOR"])
def test_int8_decode_attention_reads_the_dequantized_cache(cache):
    """The int8 forms time attention over their codes times their scales, the new token written
    quantized into the bound buffer."""
    q_heads, kv_heads, head_dim, layers = 8, 2, 16, 2
    a = DecodeAttention(rows=2, cached=37, q_heads=q_heads, layers=layers, kv_heads=kv_heads, head_dim=head_dim, cache=cache)
    assert a.keys[0].dtype == np.int8 and a.bytes_read == 2 * layers * 2 * kv_heads * 38 * head_dim
    if cache == "PER_TENSOR":
        assert np.unique(a.scales).size == 1
    out = a.run()
    s = a.scales[None, :, None, :]
    k_new = a.k.reshape(2, kv_heads, head_dim)
    np.testing.assert_array_equal(a.keys[0][:, :, 37], np.clip(np.rint(k_new / s[:, :, 0]), -128, 127))
    codes = [(k.copy(), v.copy()) for k, v in zip(a.keys, a.values, strict=True)]
    for i, (k, v) in enumerate(codes):  # the float reference over the dequantized cache, new token included
        a.keys[i], a.values[i] = k * s, v * s
    a.k, a.v = a.keys[0][:, :, 37].reshape(2, 1, -1), a.values[0][:, :, 37].reshape(2, 1, -1)
    if layers > 1:  # every layer got the same new token, so layer 0's dequantized row stands for all
        for i in range(1, layers):
            np.testing.assert_array_equal(codes[i][0][:, :, 37], codes[0][0][:, :, 37])
    ref = sum(_reference(a, i, q_heads, kv_heads, head_dim) for i in range(layers))
    # float32 dequantize-and-dot against float64: |diff| measured below 1e-6 (outputs ~1)
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
    assert "| k | 4 x 256 x 128 |" in table and "| decode attention (2 layers) | 100 |" in table
    assert "3 chained 128 x 128 MatMulNBits int4" in table and "| M = 1 |" in table and "| 1.00x |" in table
