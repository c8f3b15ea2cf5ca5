"""The MatMulNBits block layout, read back: the one definition the exporter's accuracy checks and
the runtime's token table share (numpy only, below both layers, like ``graph_io``)."""

from __future__ import annotations

import numpy as np


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                      block_size: int) -> np.ndarray:  # fmt: skip
    """Rows of blocks back to float32, as MatMulNBits multiplies by them.

    ``packed`` uint8 (n, blocks, block_size * bits / 8), element 2i of a 4-bit block in the low
    nibble of byte i; ``scales`` (n, blocks); ``zero_points`` (n, ceil(blocks / 2)) packed two a byte
    for 4 bits, None for 8 bits (zero point 128, the kernel's default). Returns (n, blocks * block_size).
    """
    n, blocks = packed.shape[:2]
    if bits == 8:
        vals = packed.astype(np.float32) - 128.0
    else:
        vals = np.empty((n, blocks, block_size), np.float32)
        vals[..., 0::2] = packed & 0x0F
        vals[..., 1::2] = packed >> 4
        assert zero_points is not None
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
        vals -= zp[..., None]
    vals *= scales.reshape(n, blocks)[..., None]
    return vals.reshape(n, -1)
