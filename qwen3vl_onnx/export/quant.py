"""Block-wise weight-only quantization in the layout of ONNX Runtime's ``MatMulNBits``.

A linear weight W (out=N, in=K) is cut along K into blocks of ``block_size``; each block of each
output row gets a float scale (and, for 4 bits, a zero point). Packed layout, as the contrib-op
spec defines it: B is uint8 [N, blocks, block_size * bits / 8] with element 2i in the low nibble
of byte i (4 bits); scales are [N * blocks]; 4-bit zero points are packed two per byte,
[N * ceil(blocks / 2)]. These are pure functions so the tests can check them against a numpy
dequantization independently of any kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def quantize(w: np.ndarray, bits: int, block_size: int, rows_per_chunk: int = 4096) -> Quantized:
    """Quantize a torch-layout weight (out, in). 4 bits: asymmetric (min/max); 8 bits: symmetric.

    Rows are processed in chunks so the float temporaries stay small even for a 150k-row lm_head.
    """
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError("block_size must be a power of two >= 16")
    n, k = w.shape
    parts = [
        _quantize_rows(np.asarray(w[i : i + rows_per_chunk], np.float32), bits, block_size) for i in range(0, n, rows_per_chunk)
    ]
    zps = None if bits == 8 else np.concatenate([p.zero_points for p in parts])
    return Quantized(
        np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]), zps, bits, block_size, k, n
    )


def _quantize_rows(w: np.ndarray, bits: int, block_size: int) -> Quantized:
    n, k = w.shape
    b = _blocks(w, block_size)
    if bits == 4:
        lo = np.minimum(b.min(axis=2), 0.0)
        hi = np.maximum(b.max(axis=2), 0.0)
        scale = (hi - lo) / 15.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
        q = np.clip(np.round(b / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
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


def dequantize(q: Quantized) -> np.ndarray:
    """Back to (N, K) float32: what MatMulNBits multiplies by (used by tests and accuracy reports)."""
    if q.bits == 4:
        vals = np.empty((*q.packed.shape[:2], q.block_size), np.float32)
        vals[..., 0::2] = q.packed & 0x0F
        vals[..., 1::2] = q.packed >> 4
        zp = np.stack([q.zero_points & 0x0F, q.zero_points >> 4], axis=1).reshape(q.n, -1)[:, : q.packed.shape[1]]
        vals -= zp[..., None]
    else:
        vals = q.packed.astype(np.float32) - 128.0
    w = vals * q.scales.reshape(q.n, -1)[..., None]
    return w.reshape(q.n, -1)[:, : q.k]


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel for ``DynamicQuantizeMatMul``: (int8 (K, N) = W^T, scale (N,)).

    The activation side is quantized by the kernel at run time (uint8, per tensor), so only the
    weight's scale is fixed here.
    """
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax == 0, 1.0, amax / 127.0).astype(np.float32)
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scale
