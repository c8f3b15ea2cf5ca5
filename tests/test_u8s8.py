"""The u8 x s8 GEMMs (int8 vision tower, --prefill-int8 graph) compute the same on every x86 CPU.

On CPUs without VNNI (AVX2; AVX-512 without VNNI) MLAS multiplies u8 activations by s8 weights
with VPMADDUBSW, whose pair sums saturate at int16. The exporter keeps weight codes within
``U8S8_WEIGHT_MAX`` so no pair can saturate. Two kinds of check:
- a numpy emulation of VPMADDUBSW over the weights a bundle stores, with the activations that
  drive each pair furthest, must equal exact integer arithmetic: this proves a bundle safe for an
  AVX2 machine even when the suite runs on a VNNI one (the emulation itself is shown to catch
  full-range weights);
- the real ONNX Runtime kernels, fed weights at the code limit and activations at the top of the
  u8 range (pair sums that overflow int16 with full-range weights), must match exact dequantized
  arithmetic. On a VNNI CPU this checks the graph wiring; on an AVX2 CPU it catches saturation
  (under an emulated AVX2 EPYC, qemu-x86_64 -cpu EPYC, full-range codes miss by 37-75%).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qwen3vl_onnx.export.graph import FLOAT, Graph
from qwen3vl_onnx.export.quant import U8S8_WEIGHT_MAX, quantize_per_channel

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1


def vpmaddubsw(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The instruction on (..., K) u8 ``a`` and s8 ``b`` (K even): a[2i]*b[2i] + a[2i+1]*b[2i+1],
    saturated to int16 (Intel SDM, PMADDUBSW)."""
    prod = a.astype(np.int32) * b.astype(np.int32)
    return np.clip(prod[..., 0::2] + prod[..., 1::2], INT16_MIN, INT16_MAX)


def gemm_u8s8_avx2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M, K) u8 @ (K, N) s8 as MLAS's AVX2 kernel sums it: int16 pair sums, then int32.

    Pairs are consecutive K elements, as MLAS packs B; K is zero-padded to even.
    """
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    out = np.empty((a.shape[0], b.shape[1]), np.int64)
    for j in range(b.shape[1]):  # one column at a time keeps the (M, K/2) temporaries small
        out[:, j] = vpmaddubsw(a, b[:, j]).sum(axis=1, dtype=np.int64)
    return out


def worst_activations(q: np.ndarray) -> np.ndarray:
    """For each column of s8 ``q`` (K, N), the u8 rows that push its pair sums furthest up and down:
    255 where the weight has that sign, 0 elsewhere. (2N, K)."""
    return np.concatenate([np.where(q.T > 0, 255, 0), np.where(q.T < 0, 255, 0)]).astype(np.uint8)


def assert_safe_on_avx2(q: np.ndarray, name: str) -> None:
    a = worst_activations(q)
    exact = a.astype(np.int64) @ q.astype(np.int64)
    emulated = gemm_u8s8_avx2(a, q)
    bad = int((emulated != exact).sum())
    assert bad == 0, f"{name}: {bad} outputs saturate VPMADDUBSW (max |code| {np.abs(q).max()})"


def test_emulation_catches_full_range_weights():
    """Full-range codes (+-127) saturate in the emulation; the exporter's codes do not."""
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    w[:, :2] = 3.0  # one pair per row at the row's extreme, same sign
    full, _ = quantize_per_channel(w, qmax=127)
    with pytest.raises(AssertionError, match="saturate"):
        assert_safe_on_avx2(full, "full range")
    ours, _ = quantize_per_channel(w)
    assert np.abs(ours).max() == U8S8_WEIGHT_MAX
    assert_safe_on_avx2(ours, "exported")
    assert U8S8_WEIGHT_MAX * 255 * 2 <= INT16_MAX


def _u8s8_weights(path) -> dict[str, np.ndarray]:
    """Every s8 weight a u8 x s8 GEMM node of this graph multiplies by, by initializer name."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    ops = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    return {n.input[1]: numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node if n.op_type in ops}


def test_exported_u8s8_weights_are_safe_on_avx2(int8_bundle):
    """Every u8 x s8 weight of an int8 bundle with --prefill-int8 (vision tower and prompt graph)."""
    vision, prefill = _u8s8_weights(int8_bundle / "vision.onnx"), _u8s8_weights(int8_bundle / "decoder_prefill.onnx")
    assert len(vision) >= 4 and len(prefill) >= 4  # patch embed, qkv, proj, fc1, fc2, mergers / qkv, o, gate-up, down
    for name, q in {**vision, **prefill}.items():
        assert q.dtype == np.int8 and np.abs(q).max() <= U8S8_WEIGHT_MAX, name
        assert_safe_on_avx2(q, name)


def _one_linear(tmp_path, build, k: int, n: int) -> ort.InferenceSession:
    g = Graph("one", tmp_path / "one.onnx")
    g.output(build(g, g.input("x", FLOAT, ["m", k])), "y", FLOAT, ["m", n])
    g.save()
    return ort.InferenceSession(str(tmp_path / "one.onnx"), providers=["CPUExecutionProvider"])


def _hard_case(k: int = 256, n: int = 64, m: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Weights whose every column reaches the code limit with one sign over whole pairs, and
    activations that quantize to the top of the u8 range: with +-127 codes each pair would sum
    to 255 * 254 = 64770, twice int16's range."""
    rng = np.random.default_rng(3)
    sign = rng.choice([-1.0, 1.0], n)
    w = (sign[:, None] * rng.uniform(0.8, 1.0, (n, k))).astype(np.float32)
    w[:, :4] = sign[:, None]  # the column maxima, a whole pair of them
    x = rng.uniform(9.0, 10.0, (m, k)).astype(np.float32)
    x[:, -1] = -0.5  # a small negative so the u8 zero point is not 0
    return w, x


def test_dynamic_quantize_matmul_is_exact(tmp_path):
    """DynamicQuantizeMatMul (the int8 vision tower) against exact arithmetic on its own quantization:
    x to u8 with one scale and zero point per tensor, weights as the exporter stores them."""
    w, x = _hard_case()
    sess = _one_linear(tmp_path, lambda g, x: g.linear_int8_dynamic(x, w, None, "l"), w.shape[1], w.shape[0])
    q, scale = quantize_per_channel(w)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / step), 0, 255)
    xq = np.clip(np.round(x / step) + zp, 0, 255)
    exact = ((xq - zp) @ q.astype(np.float64)) * step * scale
    got = sess.run(None, {"x": x})[0]
    err = np.abs(got - exact).max() / np.abs(exact).max()
    assert err < 1e-5, f"relative error {err:.3g} (saturated pair sums give 0.37)"


def test_per_row_int8_matmul_is_exact(tmp_path):
    """The --prefill-int8 graph's per-row u8 x s8 matmul against exact arithmetic: each row to u8
    with step max|row| / 127 and zero point 128."""
    w, x = _hard_case()
    sess = _one_linear(tmp_path, lambda g, x: g.linear_int8_rows(x, w, "l"), w.shape[1], w.shape[0])
    q, scale = quantize_per_channel(w)
    step = (np.abs(x).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    xq = np.clip(np.round(x / step), -128, 127)
    exact = (xq @ q.astype(np.float64)) * scale * step
    got = sess.run(None, {"x": x})[0]
    err = np.abs(got - exact).max() / np.abs(exact).max()
    assert err < 1e-5, f"relative error {err:.3g} (saturated pair sums give 0.75)"


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_int8_compute_does_not_saturate(tmp_path, bits):
    """MatMulNBits with int8 compute (accuracy level 4: the decoder's kernel, 4-bit and the 8-bit
    projections) on the same hard case, against float arithmetic of the stored weights. Its int8
    activations are per block and symmetric, so no u8 x s8 pair can reach int16's limit: measured
    relative error 2e-4 on both CPU kinds (VNNI, and AVX2 under qemu-x86_64 -cpu EPYC), where the
    u8 x s8 GEMMs with full-range codes gave 0.44-0.88 under the same emulation. The bound also
    holds the activation rounding (one int8 step per block of 128 values at ~10)."""
    from qwen3vl_onnx.export.quant import dequantize, quantize

    w, x = _hard_case()
    sess = _one_linear(tmp_path, lambda g, x: g.linear_nbits(x, w, "l", bits, 128, 4), w.shape[1], w.shape[0])
    exact = x.astype(np.float64) @ dequantize(quantize(w, bits, 128)).astype(np.float64).T
    got = sess.run(None, {"x": x})[0]
    err = np.abs(got - exact).max() / np.abs(exact).max()
    assert err < 2e-3, f"relative error {err:.3g}"
