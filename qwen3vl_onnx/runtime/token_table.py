"""The token embedding table, as the bundle stores it: a plain array, or MatMulNBits-layout blocks.

Quantized bundles keep one table in blocks (``export`` docs): for a tied checkpoint it is the very
bytes of the decoder's lm_head weight (read from the graph's data file, so the bundle holds the
table once), for an untied one a table of its own in the same layout. A lookup dequantizes only the
rows asked for, so memory holds the compact table (mapped, paged in as tokens are used) and never
a float copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..nbits import dequantize_blocks


class TokenTable:
    """``rows(ids)`` -> (n, hidden) float32 embeddings."""

    def __init__(self, bundle: Path, entry: Mapping[str, Any]):
        self.kind = entry.get("kind", "array")
        if self.kind == "array":
            self._array = np.load(bundle / entry["file"], mmap_mode="r")
            self.shape = tuple(self._array.shape)
            return
        if self.kind != "blocks":
            raise ValueError(f"unknown token table kind {self.kind!r}")
        self.bits, self.block_size = int(entry["bits"]), int(entry["block_size"])
        self.shape = (int(entry["rows"]), int(entry["cols"]))
        path = bundle / entry["file"]
        part = lambda key, dtype: (
            None
            if entry.get(key) is None
            else np.memmap(  # noqa: E731
                path, dtype, "r", int(entry[key]["offset"]), tuple(entry[key]["shape"])
            )
        )
        self.packed = part("qweight", np.uint8)  # (rows, blocks, block_size * bits / 8)
        self.scales = part("scales", np.float32).reshape(self.shape[0], -1)  # (rows, blocks)
        zps = part("zero_points", np.uint8)
        self.zero_points = None if zps is None else zps.reshape(self.shape[0], -1)  # 4 bits: two blocks a byte

    def rows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.kind == "array":
            return np.asarray(self._array[ids], dtype=np.float32)
        zps = None if self.zero_points is None else np.asarray(self.zero_points[ids])
        rows = dequantize_blocks(np.asarray(self.packed[ids]), np.asarray(self.scales[ids]), zps, self.bits, self.block_size)
        return rows[:, : self.shape[1]]
