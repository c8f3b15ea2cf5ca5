"""The decoder's KV cache: one preallocated buffer per layer, rows that each keep their own length.

Fused bundles bind the same buffer as GroupQueryAttention's past and present, so a call writes the
new keys in place at each row's ``seqlens_k``: nothing is copied per token, and dropping the last
``n`` tokens of a row (``trim``) only lowers its length. Portable bundles (batch 1) get the
concatenated ``present`` tensors back from every call instead.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

# Capacity is a multiple of this, so growing by a few tokens does not reallocate every call.
CAPACITY_STEP = 256


def rounded_capacity(capacity: int) -> int:
    """``capacity`` rounded up to a whole number of ``CAPACITY_STEP`` positions, as buffers are allocated."""
    return capacity + (-capacity % CAPACITY_STEP)


LayerDtypes = type[np.generic] | Sequence[type[np.generic]]


def _per_layer(dtype: LayerDtypes, layers: int) -> list[type[np.generic]]:
    dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype] * layers
    if len(dtypes) != layers:
        raise ValueError(f"{len(dtypes)} cache dtypes for {layers} layers")
    return dtypes


@dataclass
class KVCache:
    """Per-layer keys and values (batch, kv_heads, capacity, head_dim), with per-row state.

    ``lengths[b]`` tokens of row ``b`` are cached; ``rope_deltas[b]`` is its MRoPE offset (images
    compress positions, so row b's next position is ``lengths[b] + rope_deltas[b]``).
    """

    keys: list[np.ndarray]
    values: list[np.ndarray]
    lengths: np.ndarray
    rope_deltas: np.ndarray
    fused: bool = True
    growable: bool = True  # False for a row view: its buffer belongs to the batch cache
    _bound: list[tuple[ort.OrtValue, ort.OrtValue]] = field(default_factory=list, repr=False)

    @staticmethod
    def position_bytes(layers: int, kv_heads: int, head_dim: int, dtype: LayerDtypes = np.float32) -> int:
        """Bytes one cached position of one row takes: keys and values of every layer (``dtype``
        one for all layers or one per layer)."""
        return 2 * kv_heads * head_dim * sum(np.dtype(d).itemsize for d in _per_layer(dtype, layers))

    @staticmethod
    def size_bytes(layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                   dtype: LayerDtypes = np.float32) -> int:  # fmt: skip
        """Bytes of a fused cache of ``capacity`` positions per row (``dtype`` as ``position_bytes``)."""
        return batch * rounded_capacity(capacity) * KVCache.position_bytes(layers, kv_heads, head_dim, dtype)

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, fused: bool,
              dtype: LayerDtypes = np.float32) -> KVCache:  # fmt: skip
        """An empty cache; ``dtype`` (one, or one per layer) int8 where a bundle's int8-cache graph
        quantizes that layer's cache."""
        cap = rounded_capacity(capacity) if fused else 0
        dtypes = _per_layer(dtype, layers)
        zeros = lambda d: np.zeros((batch, kv_heads, cap, head_dim), d)  # noqa: E731
        return cls([zeros(d) for d in dtypes], [zeros(d) for d in dtypes],
                   np.zeros(batch, np.int64), np.zeros(batch, np.int64), fused)  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold now."""
        return sum(a.nbytes for a in (*self.keys, *self.values))

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """Tokens cached in the longest row (for batch 1: the row's length)."""
        return int(self.lengths.max()) if self.batch else 0

    def next_positions(self) -> np.ndarray:
        """(B,) position of each row's next token."""
        return self.lengths + self.rope_deltas

    def row(self, b: int) -> KVCache:
        """Row ``b`` as a batch-1 cache that shares this cache's memory (keys, values, length and
        delta): a prompt is prefilled into its slot with batch-1 calls, then decoded with the rest."""
        return self.rows(b, b + 1)

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows ``start`` to ``stop - 1`` as a cache sharing this one's memory: a decode step for
        the busy rows need not compute the idle ones around them."""
        if not self.fused:
            raise ValueError("row views need the fused (preallocated) cache layout")
        s = slice(start, stop)
        return KVCache([k[s] for k in self.keys], [v[s] for v in self.values], self.lengths[s], self.rope_deltas[s],
                       fused=True, growable=False)  # fmt: skip

    def reset(self, rows: np.ndarray | slice | int | None = None) -> None:
        """Forget the given rows (all by default); O(1), the buffer is overwritten as it refills."""
        sel = slice(None) if rows is None else rows
        self.lengths[sel] = 0
        self.rope_deltas[sel] = 0
        if not self.fused:
            self.keys = [k[:, :, :0] for k in self.keys]
            self.values = [v[:, :, :0] for v in self.values]

    def trim(self, n: int) -> None:
        """Drop the last ``n`` tokens of every row (a rejected or regenerated suffix).

        Positions of kept tokens do not change, so the MRoPE delta stays: it is fixed by the images
        in the kept prefix, and a trim into an image is the caller's to avoid.
        """
        if n < 0 or n > int(self.lengths.min()):
            raise ValueError(f"cannot trim {n} tokens from rows of lengths {self.lengths.tolist()}")
        self.lengths -= n
        if not self.fused:
            keep = int(self.lengths[0])
            self.keys = [k[:, :, :keep] for k in self.keys]
            self.values = [v[:, :, :keep] for v in self.values]

    def ensure(self, needed: int) -> None:
        """Room for ``needed`` tokens per row (fused layout), growing by doubling, keeping contents.
        Portable caches are exactly as long as their contents and need nothing."""
        if not self.fused:
            return
        cap = self.keys[0].shape[2]
        if self._bound and needed <= cap:
            return
        if needed > cap:
            if not self.growable:
                raise ValueError(f"row holds {cap} tokens, {needed} needed")
            new_cap = rounded_capacity(max(needed, 2 * cap))
            grow = lambda a: np.concatenate([a, np.zeros((*a.shape[:2], new_cap - cap, a.shape[3]), a.dtype)], axis=2)  # noqa: E731
            self.keys, self.values = [grow(k) for k in self.keys], [grow(v) for v in self.values]
        self._bound = [
            (ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v))
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def prefault(self) -> None:
        """Write every page of the buffer now (each keeps its value), so no later call pays for
        mapping it. Why: a fresh row's first decoder call maps its whole row (GroupQueryAttention
        touches the full capacity once); on this project's VMs that took 1.7 s for one 4096-token
        4B row and 7.2 s for four, stalling every stream of a server. A server does this at load."""
        for a in (*self.keys, *self.values):
            a.reshape(-1)[:: mmap.PAGESIZE // a.itemsize] += 0  # a read and a write per page

    def bindings(self) -> list[tuple[ort.OrtValue, ort.OrtValue]]:
        """Each layer's (keys, values) as ONNX Runtime values over this cache's own memory."""
        return self._bound
