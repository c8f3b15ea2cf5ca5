"""Does this CPU's ONNX Runtime saturate the int8 GEMMs? Relative error of each int8 kernel against
float arithmetic of the weights it stores, with weight codes at +-127 (full range) and at the
exporter's +-64, on a hard case (activations and weights driving every u8 x s8 pair sum up) and on
Gaussian data. Run it natively and under ``qemu-x86_64 -cpu EPYC`` (AVX2 without VNNI):

    python scripts/check_u8s8.py
    qemu-x86_64 -cpu EPYC $(which python) scripts/check_u8s8.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

import qwen3vl_onnx.export.graph as graph_module
from qwen3vl_onnx.export import quant
from qwen3vl_onnx.export.graph import FLOAT, Graph


def run(build: Callable[[Graph, str], str], x: np.ndarray, n: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        g = Graph("one", Path(d) / "one.onnx")
        g.output(build(g, g.input("x", FLOAT, ["m", x.shape[1]])), "y", FLOAT, ["m", n])
        g.save()
        sess = ort.InferenceSession(str(Path(d) / "one.onnx"), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]


def rel_err(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.abs(got - exact).max() / np.abs(exact).max())


def cases(k: int = 512, n: int = 64, m: int = 8) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    sign = rng.choice([-1.0, 1.0], n)
    w = (sign[:, None] * rng.uniform(0.8, 1.0, (n, k))).astype(np.float32)
    w[:, :4] = sign[:, None]
    x = rng.uniform(9.0, 10.0, (m, k)).astype(np.float32)
    x[:, -1] = -0.5
    gauss = (rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32))
    return {"hard": (x, w), "gaussian": gauss}


def main() -> None:
    full = quant.quantize_per_channel
    for label, (x, w) in cases().items():
        n = w.shape[0]
        for qmax in (127, quant.U8S8_WEIGHT_MAX):
            q, s = full(w, qmax=qmax)
            exact = x.astype(np.float64) @ (q.T.astype(np.float64) * s[:, None]).T
            graph_module.quantize_per_channel = lambda a, qmax=qmax: full(a, qmax)  # what the graph stores
            dyn = run(lambda g, t, w=w: g.linear_int8_dynamic(t, w, None, "l"), x, n)
            rows = run(lambda g, t, w=w: g.linear_int8_rows(t, w, "l"), x, n)
            graph_module.quantize_per_channel = full
            print(f"{label:8} codes +-{qmax:3}: DynamicQuantizeMatMul {rel_err(dyn, exact):.4f}, "
                  f"per-row MatMulIntegerToFloat {rel_err(rows, exact):.4f}")  # fmt: skip
        for bits in (4, 8):
            exact = x.astype(np.float64) @ quant.dequantize(quant.quantize(w, bits, 128)).astype(np.float64).T
            got = run(lambda g, t, w=w, bits=bits: g.linear_nbits(t, w, "l", bits, 128, 4), x, n)
            print(f"{label:8} MatMulNBits {bits}-bit, accuracy level 4: {rel_err(got, exact):.4f}")


if __name__ == "__main__":
    main()
