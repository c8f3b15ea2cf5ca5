"""``qwen3vl-onnx bench --kernels``: what this CPU's ONNX Runtime matmul kernels reach, in GOPS.

The bundle figures of ``bench`` are read against these: a square fp32 MatMul and a square u8 x s8
GEMM estimate the machine's fp32 and int8 peaks, and the kernels the bundles use run at the 4B
shapes (vision tower: M = 784 patches of a 448x448 image; prompt: M = 256; decode: M = 1). Each
figure is the best of several runs of one single-node graph, 2 * M * K * N operations per call.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..export.graph import FLOAT, Graph

# (label, kernel, M, K, N)
CASES = [
    ("fp32 peak: MatMul 2048^3", "fp32", 2048, 2048, 2048),
    ("int8 peak: u8 x s8 GEMM 2048^3", "u8s8", 2048, 2048, 2048),
    ("vision fc1, fp32 MatMul", "fp32", 784, 1024, 4096),
    ("vision fc1, u8 x s8 (DynamicQuantizeMatMul)", "u8s8", 784, 1024, 4096),
    ("prefill MLP, MatMulNBits int4 (int8 compute)", "nbits4", 256, 2560, 9728),
    ("prefill MLP, MatMulNBits int8 (int8 compute)", "nbits8", 256, 2560, 9728),
    ("prefill MLP, per-row u8 x s8 (--prefill-int8)", "rows", 256, 2560, 9728),
    ("decode MLP, MatMulNBits int4", "nbits4", 1, 2560, 9728),
    ("decode MLP, MatMulNBits int8", "nbits8", 1, 2560, 9728),
]


def _build(kernel: str, w: np.ndarray) -> Callable[[Graph, str], str]:
    def build(g: Graph, x: str) -> str:
        if kernel == "fp32":
            return g.linear(x, w, None, "w")
        if kernel == "u8s8":
            return g.linear_int8_dynamic(x, w, None, "w")
        if kernel == "rows":
            return g.linear_int8_rows(x, w, "w")
        return g.linear_nbits(x, w, "w", int(kernel[-1]), 128, 4)

    return build


def measure_case(kernel: str, m: int, k: int, n: int, repeats: int, threads: int | None = None) -> float:
    """Best GOPS of one matmul kind at (M, K) x (K, N)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        g = Graph("kernel", Path(d) / "k.onnx")
        g.output(_build(kernel, w)(g, g.input("x", FLOAT, ["m", k])), "y", FLOAT, ["m", n])
        g.save()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(Path(d) / "k.onnx"), opts, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((m, k), dtype=np.float32)
    sess.run(None, {"x": x})
    best = float("inf")
    calls = max(1, int(2e9 // (2 * m * k * n)))  # about 2 GOP per timed sample, so tiny M is not all overhead
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            sess.run(None, {"x": x})
        best = min(best, (time.perf_counter() - t) / calls)
    return 2 * m * k * n / best / 1e9


def measure_kernels(repeats: int) -> list[dict]:
    return [{"case": label, "kernel": kernel, "m": m, "k": k, "n": n, "gops": measure_case(kernel, m, k, n, repeats)}
            for label, kernel, m, k, n in CASES]  # fmt: skip


def kernels_markdown(rows: list[dict], machine: dict) -> str:
    lines = ["| kernel | M x K x N | GOPS |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['m']} x {r['k']} x {r['n']} | {r['gops']:.0f} |" for r in rows]
    flags = " ".join(machine.get("cpu_flags", [])) or "unknown"
    lines += ["", f"Machine: {machine['cpu']}, {machine['cores']} cores, CPU flags: {flags}; "
              f"onnxruntime {machine['onnxruntime']}. Best of the repeats, 2*M*K*N operations per call."]  # fmt: skip
    return "\n".join(lines) + "\n"
