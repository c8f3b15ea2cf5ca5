"""``qwen3vl-onnx bench --kernels``: what this CPU's ONNX Runtime matmul kernels reach, in GOPS.

The bundle figures of ``bench`` are read against these: a square fp32 MatMul and a square u8 x s8
GEMM estimate the machine's fp32 and int8 peaks, and the kernels the bundles use run at the 4B
shapes (vision tower: M = 784 patches of a 448x448 image; prompt: M = 256; decode: M = 1). Each
figure is the best of several runs of one single-node graph, 2 * M * K * N operations per call.

Two decode figures are timed over more memory than the CPU's caches hold, as a decoder step's are,
for what a server's step over several streams costs against one stream's: a chain of int4 matmuls
at M = 1, 2, 4, 8 rows, and a 4B step's 36 GroupQueryAttention calls for one new token per row,
each over its own preallocated cache bound as its past and present (as the decoder runs them), for
1 and 4 rows and for one query head per kv head (its figure: cache read per second), and over an
int8 cache with per-channel or per-tensor kernel scales at 100 and 2000 cached positions (what a long
conversation adds to a step, and what the equalized per-tensor form of ``export.kv_int8`` saves).
The same attention for a 512-token prompt chunk over 1536 cached positions, float and int8: what
each cache form costs a long prompt.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..export.graph import FLOAT, MS_DOMAIN, Graph
from ..runtime.cache import rounded_capacity

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
# A server's decode step over M streams: 24 chained 2560 x 2560 int4 matmuls (78 MB of weights,
# more than the CPU's caches hold, as a step's are), so each call reads its weights from memory.
CHAIN, CHAIN_LAYERS, CHAIN_ROWS = 2560, 24, (1, 2, 4, 8)

# (label, rows, new tokens per row, cached positions, query heads, cache form, layers): 4B attention,
# 8 kv heads of 128. A step's 36 layers (caches larger than the CPU's, as a step's are); the int8
# forms at 100 and 2000 cached: what a long conversation adds to a step. A prompt chunk's 512 new
# tokens over 1536 cached on 4 layers (compute-bound: what each cache form costs a long prompt).
ATTENTION_CASES = [
    ("decode attention, 1 row", 1, 1, 1000, 32, "fp32", 36),
    ("decode attention, 4 rows", 4, 1, 1000, 32, "fp32", 36),
    ("decode attention, 1 row, 8 query heads (one per kv head)", 1, 1, 1000, 8, "fp32", 36),
    *[(f"decode attention, 1 row, int8 cache {form.lower().replace('_', '-')}", 1, 1, cached, 32, form, 36)
      for form in ("PER_CHANNEL", "PER_TENSOR") for cached in (100, 2000)],
    *[(f"prompt attention, {'float' if form == 'fp32' else 'int8 ' + form.lower().replace('_', '-')} cache", 1, 512, 1536,
       32, form, 4) for form in ("fp32", "PER_CHANNEL", "PER_TENSOR")],
]  # fmt: skip
CACHE_FORMS = ("fp32", "PER_CHANNEL", "PER_TENSOR")  # float, or int8 with the kernel's per-channel / one scale
KV_HEADS, HEAD_DIM = 8, 128


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


def measure_chain(rows: tuple[int, ...], repeats: int, k: int = CHAIN, layers: int = CHAIN_LAYERS) -> list[dict]:
    """Median ms of ``layers`` chained k x k MatMulNBits int4 calls at each M in ``rows`` (the M
    alternate, so drift on a shared machine falls on all of them)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        g = Graph("chain", Path(d) / "c.onnx")
        x = g.input("x", FLOAT, ["m", k])
        for i in range(layers):
            x = g.linear_nbits(x, (rng.standard_normal((k, k), dtype=np.float32) * 0.02), f"w{i}", 4, 128, 4)
        g.output(x, "y", FLOAT, ["m", k])
        g.save()
        sess = ort.InferenceSession(str(Path(d) / "c.onnx"), providers=["CPUExecutionProvider"])
    xs = {m: rng.standard_normal((m, k), dtype=np.float32) for m in rows}
    times: dict[int, list[float]] = {m: [] for m in rows}
    for _ in range(max(repeats, 5)):
        for m, x in xs.items():
            sess.run(None, {"x": x})
            t = time.perf_counter()
            for _ in range(5):
                sess.run(None, {"x": x})
            times[m].append((time.perf_counter() - t) / 5)
    return [{"m": m, "k": k, "n": k, "layers": layers, "ms": 1e3 * float(np.median(ts))} for m, ts in times.items()]


def measure_kernels(repeats: int) -> list[dict]:
    return [{"case": label, "kernel": kernel, "m": m, "k": k, "n": n, "gops": measure_case(kernel, m, k, n, repeats)}
            for label, kernel, m, k, n in CASES]  # fmt: skip


class DecodeAttention:
    """A decoder call's attention alone: ``layers`` GroupQueryAttention nodes, each over its own
    cache buffer bound as both its past and its present (each call writes the new keys at the rows'
    ``cached`` lengths in place), all fed the same ``new`` tokens per row (1: a decode step; more: a
    prompt chunk, causal among themselves); the output is their sum.
    Why several layers: one layer's cache stays in the CPU's caches between calls, a step's does not.
    ``cache`` "PER_CHANNEL" / "PER_TENSOR": an int8 cache (codes in -127..127) with the kernel's
    per-channel scales or its one scale per layer (``scales``, (kv_heads, head_dim) each)."""

    def __init__(self, rows: int, cached: int, q_heads: int, layers: int, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM,
                 cache: str = "fp32", new: int = 1):  # fmt: skip
        if cache not in CACHE_FORMS:
            raise ValueError(f"cache must be one of {CACHE_FORMS}, got {cache!r}")
        if new > 1 and rows > 1:
            raise ValueError("a prompt chunk (new > 1) over a cache takes one row (GroupQueryAttention's rule)")
        rng = np.random.default_rng(0)
        self.q = rng.standard_normal((rows, new, q_heads * head_dim), dtype=np.float32)
        self.k, self.v = (rng.standard_normal((rows, new, kv_heads * head_dim), dtype=np.float32) for _ in range(2))
        total = cached + new
        shape = (rows, kv_heads, rounded_capacity(total), head_dim)
        int8 = cache != "fp32"
        dtype = np.int8 if int8 else FLOAT

        def make() -> np.ndarray:
            return rng.integers(-127, 128, shape, dtype=np.int8) if int8 else rng.standard_normal(shape, dtype=np.float32)

        self.keys = [make() for _ in range(layers)]
        self.values = [make() for _ in range(layers)]
        step = 4.0 / 127 if cache == "PER_TENSOR" else rng.uniform(1.0, 4.0, (kv_heads, head_dim)) / 127
        self.scales = np.full((kv_heads, head_dim), step, np.float32)  # |k|, |v| up to ~4: a unit normal's range
        self.cached = cached
        self.bytes_read = 2 * layers * self.keys[0][:, :, :total].nbytes
        width = {"q": q_heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
        with tempfile.TemporaryDirectory() as d:
            g = Graph("attention", Path(d) / "a.onnx")
            fed = [g.input(n, FLOAT, ["b", "s", w]) for n, w in width.items()]
            lengths = [g.input("seqlens_k", np.int32, ["b"]), g.input("total_sequence_length", np.int32, [])]
            outs = []
            quant: list[str] = []
            attrs: dict = {}
            if int8:
                scale = self.scales[None, :, None, :] if cache == "PER_CHANNEL" else self.scales.reshape(-1)[:1]
                quant = ["", "", "", "", "", g.weight("k_scale", scale, np.float32), g.weight("v_scale", scale, np.float32)]
                attrs = {"kv_cache_bit_width": 8, "k_quant_type": cache, "v_quant_type": cache}
            for i in range(layers):
                past = [g.input(f"{n}.{i}", dtype, ["b", kv_heads, "c", head_dim]) for n in ("past_key", "past_value")]
                o, pk, pv = g.op("GroupQueryAttention", *fed, *past, *lengths, *quant, domain=MS_DOMAIN, num_heads=q_heads,
                                 kv_num_heads=kv_heads, scale=head_dim**-0.5, n_out=3, **attrs)  # fmt: skip
                for value, name in ((pk, f"present_key.{i}"), (pv, f"present_value.{i}")):
                    g.output(value, name, dtype, ["b", kv_heads, "c", head_dim])
                outs.append(o)
            g.output(g.op("Sum", *outs) if layers > 1 else outs[0], "o", FLOAT, ["b", "s", width["q"]])
            g.save()
            self.session = ort.InferenceSession(str(Path(d) / "a.onnx"), providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        for name, a in (("q", self.q), ("k", self.k), ("v", self.v)):
            self.binding.bind_cpu_input(name, a)
        self.binding.bind_cpu_input("seqlens_k", np.full(rows, total - 1, np.int32))
        self.binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        self.binding.bind_output("o", "cpu")  # first, so it is get_outputs()[0]
        for i in range(layers):
            for n, a in (("key", self.keys[i]), ("value", self.values[i])):
                buf = ort.OrtValue.ortvalue_from_numpy(a)
                self.binding.bind_ortvalue_input(f"past_{n}.{i}", buf)
                self.binding.bind_ortvalue_output(f"present_{n}.{i}", buf)

    def run(self) -> np.ndarray:
        """(rows, new, q_heads * head_dim): the layers' summed attention outputs for the new tokens."""
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()


def measure_attention(rows: int, cached: int, q_heads: int, repeats: int, layers: int = 36, cache: str = "fp32",
                      new: int = 1) -> dict:  # fmt: skip
    """Best time of one call's attention and the cache it reads per second."""
    a = DecodeAttention(rows, cached, q_heads, layers, cache=cache, new=new)
    t = time.perf_counter()
    a.run()
    first = time.perf_counter() - t
    calls = max(1, min(int(1e9 // a.bytes_read), int(0.5 / first)))  # ~1 GB of cache or ~0.5 s per sample
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            a.session.run_with_iobinding(a.binding)
        best = min(best, (time.perf_counter() - t) / calls)
    return {"layers": layers, "new": new, "ms_per_step": best * 1e3, "cache_gb_s": a.bytes_read / best / 1e9}


def measure_attention_cases(repeats: int) -> list[dict]:
    return [{"case": label, "rows": rows, "cached": cached, "q_heads": heads, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
             "cache": cache, **measure_attention(rows, cached, heads, repeats, layers, cache, new)}
            for label, rows, new, cached, heads, cache, layers in ATTENTION_CASES]  # fmt: skip


def kernels_markdown(rows: list[dict], machine: dict, attention: list[dict] = (), chain: list[dict] = ()) -> str:
    lines = ["| kernel | M x K x N | GOPS |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['m']} x {r['k']} x {r['n']} | {r['gops']:.0f} |" for r in rows]
    if chain:
        one = chain[0]["ms"]
        lines += ["", f"| decode over M streams: {chain[0]['layers']} chained {chain[0]['k']} x {chain[0]['n']} MatMulNBits int4 "
                  "| ms (median) | over M = 1 |", "|---|---|---|"]  # fmt: skip
        lines += [f"| M = {r['m']} | {r['ms']:.2f} | {r['ms'] / one:.2f}x |" for r in chain]
    if attention:
        lines += ["", "| GroupQueryAttention | new tokens per row | cached positions | ms per call | cache read GB/s |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['case']} ({r['layers']} layers) | {r.get('new', 1)} | {r['cached']} | {r['ms_per_step']:.1f} "
                  f"| {r['cache_gb_s']:.1f} |" for r in attention]  # fmt: skip
    flags = " ".join(machine.get("cpu_flags", [])) or "unknown"
    lines += ["", f"Machine: {machine['cpu']}, {machine['cores']} cores, CPU flags: {flags}; "
              f"onnxruntime {machine['onnxruntime']}. Best of the repeats, 2*M*K*N operations per call."]  # fmt: skip
    return "\n".join(lines) + "\n"
