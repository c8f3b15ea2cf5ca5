"""Block-wise weight-only quantization in the layout of ONNX Runtime's ``MatMulNBits``.

A linear weight W (out=N, in=K) is cut along K into blocks of ``block_size``; each block of each
output row gets a float scale (and, for 4 bits, a zero point). Packed layout, as the contrib-op
spec defines it: B is uint8 [N, blocks, block_size * bits / 8] with element 2i in the low nibble
of byte i (4 bits); scales are [N * blocks]; 4-bit zero points are packed two per byte,
[N * ceil(blocks / 2)]. These are pure functions so the tests can check them against a numpy
dequantization independently of any kernel.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..nbits import dequantize_blocks

# Default int4/int8 block: faster than 32, and 256's extra speed costs weight error on heavy-tailed
# weights (docs/BENCHMARKS.md, "Precision and speed").
DEFAULT_BLOCK_SIZE = 128


@dataclass
class Quantized:
    packed: np.ndarray  # uint8 [N, blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N * blocks]
    zero_points: np.ndarray | None  # uint8, packed for 4 bits
    bits: int
    block_size: int
    k: int
    n: int


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """(N, K) -> (N, blocks, block_size), zero-padding K up to a whole number of blocks."""
    n, k = w.shape
    pad = -k % block_size
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    return w.reshape(n, -1, block_size)


def quantize(w: np.ndarray, bits: int, block_size: int, chunk_elements: int = 1 << 22) -> Quantized:
    """Quantize a torch-layout weight (out, in). 4 bits: asymmetric, range picked per block from
    ``SHRINK`` by squared error; 8 bits: symmetric absmax (its steps are already fine).

    Rows are processed in chunks (a few at a time, on threads) so the float temporaries stay small
    even for a 150k-row lm_head.
    """
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError("block_size must be a power of two >= 16")
    n, k = w.shape
    rows_per_chunk = max(1, chunk_elements // k)

    def rows(i: int) -> Quantized:
        return _quantize_rows(np.asarray(w[i : i + rows_per_chunk], np.float32), bits, block_size)

    # numpy releases the GIL inside its loops, so chunks quantize in parallel on threads
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(rows, range(0, n, rows_per_chunk)))
    zps = None if bits == 8 else np.concatenate([p.zero_points for p in parts])
    return Quantized(
        np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]), zps, bits, block_size, k, n
    )


# Range shrink factors tried per 4-bit block; the one with the least squared error wins. Plain
# min/max rounding spends most of 16 levels on the two extreme weights; clipping them a little
# gives the bulk finer steps. Four candidates keep almost all of the gain of a 21-point search
# (relative RMS error on Gaussian blocks of 128: 0.1006 min/max, 0.0953 these, 0.0950 fine grid;
# Student-t(4) 0.145 / 0.138 / 0.138) at a quarter of its export time. 1.0 is in the set, so no
# block is ever worse than min/max.
SHRINK = (1.0, 0.94, 0.87, 0.8)


def _quantize_rows(w: np.ndarray, bits: int, block_size: int) -> Quantized:
    n, k = w.shape
    b = _blocks(w, block_size)
    if bits == 4:
        lo0 = np.minimum(b.min(axis=2), 0.0)
        hi0 = np.maximum(b.max(axis=2), 0.0)
        best_err = np.full(lo0.shape, np.inf, np.float32)
        scale = np.ones(lo0.shape, np.float32)
        zp = np.zeros(lo0.shape, np.float32)
        q = np.zeros(b.shape, np.uint8)
        codes, err = np.empty_like(b), np.empty_like(b)
        for s in SHRINK:
            sc, z = _asym4(b, lo0 * s, hi0 * s, codes)
            np.subtract(codes, z[..., None], out=err)
            err *= sc[..., None]
            err -= b
            np.square(err, out=err)
            total = err.sum(axis=2)
            better = total < best_err
            best_err[better], scale[better], zp[better] = total[better], sc[better], z[better]
            np.copyto(q, codes, casting="unsafe", where=better[..., None])
        zp = zp.astype(np.uint8)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        zp_flat = zp.reshape(n, -1)
        if zp_flat.shape[1] % 2:
            zp_flat = np.pad(zp_flat, ((0, 0), (0, 1)), constant_values=8)
        zps = (zp_flat[:, 0::2] | (zp_flat[:, 1::2] << 4)).astype(np.uint8).ravel()
        return Quantized(packed, scale.ravel(), zps, 4, block_size, k, n)
    amax = np.abs(b).max(axis=2)
    scale = np.where(amax == 0, 1.0, amax / 127.0).astype(np.float32)
    q = (np.clip(np.round(b / scale[..., None]), -127, 127) + 128).astype(np.uint8)
    return Quantized(q, scale.ravel(), None, 8, block_size, k, n)


def _asym4(b: np.ndarray, lo: np.ndarray, hi: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point for blocks quantized over [lo, hi] (lo <= 0 <= hi); codes
    (0..15, as float) are written into ``codes`` to spare an allocation per candidate."""
    scale = (hi - lo) / 15.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.float32)
    np.multiply(b, (1.0 / scale)[..., None], out=codes)
    np.round(codes, out=codes)
    codes += zp[..., None]
    np.clip(codes, 0, 15, out=codes)
    return scale, zp


def dequantize(q: Quantized) -> np.ndarray:
    """Back to (N, K) float32: what MatMulNBits multiplies by (used by tests and accuracy reports)."""
    zps = None if q.zero_points is None else q.zero_points.reshape(q.n, -1)
    return dequantize_blocks(q.packed, q.scales.reshape(q.n, -1), zps, q.bits, q.block_size)[:, : q.k]


# Largest |weight code| of the u8 x s8 GEMMs (DynamicQuantizeMatMul, MatMulIntegerToFloat). On x86
# CPUs without VNNI, MLAS multiplies with VPMADDUBSW, which adds each pair of u8 x s8 products into
# a saturating int16: 255 * 127 * 2 overflows it and the excess is silently lost. With |code| <= 64
# every pair sum stays within 255 * 128 = 32640, so one bundle computes the same on every x86 CPU;
# the coarser step costs VNNI machines little (docs/BENCHMARKS.md, "Every x86 CPU").
U8S8_WEIGHT_MAX = 64


def quantize_per_channel(w: np.ndarray, qmax: int = U8S8_WEIGHT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel for the u8 x s8 GEMMs: (int8 (K, N) = W^T, scale (N,)).

    Codes stay within +-``qmax`` (see ``U8S8_WEIGHT_MAX``). The activation side is quantized at run
    time (uint8), so only the weight's scale is fixed here.
    """
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax == 0, 1.0, amax / qmax).astype(np.float32)
    q = np.clip(np.round(w / scale[:, None]), -qmax, qmax).astype(np.int8)
    return np.ascontiguousarray(q.T), scale
