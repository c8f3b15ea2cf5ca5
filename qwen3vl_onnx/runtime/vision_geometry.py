"""Everything about the vision tower that depends on grid sizes, computed in numpy on the host.

The vision graph has only dynamic lengths; these arrays tell it, per patch, which position-table
rows to blend and how to rotate, and how many patches form one attention block (one frame). Patch
order is the processor's: per frame, 2x2 merge blocks in raster order, each block's 4 patches in raster order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import graph_io as io
from ..config import VisionConfig

Grid = tuple[int, int, int]  # (t, h, w) in patches


def patch_rows_cols(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch of one frame, in merge-block order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return rows.reshape(shape).transpose(0, 2, 1, 3).ravel(), cols.reshape(shape).transpose(0, 2, 1, 3).ravel()


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (floor, floor+1) and weights for align_corners=True resampling to ``size``."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    lo = np.floor(src)
    taps = np.stack([lo, lo + 1], axis=1).astype(np.int64).clip(0, side - 1)
    frac = src - lo
    return taps, np.stack([1 - frac, frac], axis=1).astype(np.float32)


def position_taps(cfg: VisionConfig, grids: Sequence[Grid]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) rows of the learned position table and their bilinear weights, per patch."""
    side = cfg.num_grid_per_side
    idx, wts = [], []
    for t, h, w in grids:
        rows, cols = patch_rows_cols(h, w, cfg.spatial_merge_size)
        ht, hw = _axis_taps(rows, h, side)
        wt, ww = _axis_taps(cols, w, side)
        i = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        v = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        idx.append(np.tile(i, (t, 1)))
        wts.append(np.tile(v, (t, 1)))
    return np.concatenate(idx), np.concatenate(wts)


def rotary(cfg: VisionConfig, grids: Sequence[Grid]) -> tuple[np.ndarray, np.ndarray]:
    """(N, head_dim) cos and sin of the 2-D rotary: row angles then column angles, twice."""
    quarter = cfg.head_dim // 2
    inv_freq = (1.0 / (cfg.rope_theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter))).astype(np.float32)
    ang = []
    for t, h, w in grids:
        rows, cols = patch_rows_cols(h, w, cfg.spatial_merge_size)
        a = np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=1).astype(np.float32)
        ang.append(np.tile(a, (t, 1)))
    a = np.concatenate(ang)
    a = np.concatenate([a, a], axis=1)
    return np.cos(a), np.sin(a)


def block_length(grids: Sequence[Grid]) -> int:
    """Patches per attention block: each frame of each image attends only to itself (transformers'
    ``cu_seqlens``). One vision call takes blocks of a single length; see ``same_length_runs``."""
    lengths = {h * w for _, h, w in grids}
    if len(lengths) != 1:
        raise ValueError(f"one vision call needs frames of one size, got {sorted(lengths)} patches per frame")
    return lengths.pop()


def same_length_runs(grids: Sequence[Grid]) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive grids with the same patches per frame: one vision call each.

    Consecutive only, so the calls' outputs concatenate back in prompt order.
    """
    runs: list[tuple[int, int]] = []
    for i, (_, h, w) in enumerate(grids):
        if i and grids[i - 1][1] * grids[i - 1][2] == h * w:  # same frame size as the run it follows
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def vision_calls(grids: Sequence[Grid], max_patches: int) -> list[list[Grid]]:
    """The grids of each vision call, in order: consecutive frames of one size, at most
    ``max_patches`` patches per call (at least one frame). A video may be cut between frames into
    (t1, h, w), (t2, h, w): every frame is encoded on its own, so the features are the same."""
    calls: list[list[Grid]] = []
    for a, b in same_length_runs(grids):
        frame = grids[a][1] * grids[a][2]
        per_call = max(1, max_patches // frame)
        current: list[Grid] = []
        room = per_call
        for t, h, w in grids[a:b]:
            while t:
                if room == 0:
                    calls.append(current)
                    current, room = [], per_call
                take = min(t, room)
                current.append((take, h, w))
                t, room = t - take, room - take
        calls.append(current)
    return calls


def vision_inputs(cfg: VisionConfig, pixel_values: np.ndarray, grids: Sequence[Grid]) -> dict[str, np.ndarray]:
    """All inputs of the vision graph for images/videos already patchified, all frames one size."""
    grids = [tuple(int(x) for x in g) for g in grids]
    expected = sum(t * h * w for t, h, w in grids)
    if pixel_values.shape != (expected, cfg.patch_dim):
        raise ValueError(f"pixel_values has shape {pixel_values.shape}, grids need ({expected}, {cfg.patch_dim})")
    idx, wts = position_taps(cfg, grids)
    cos, sin = rotary(cfg, grids)
    return {
        io.PIXEL_VALUES: np.ascontiguousarray(pixel_values, dtype=np.float32),
        io.POS_INDICES: idx,
        io.POS_WEIGHTS: wts,
        io.ROTARY_COS: cos,
        io.ROTARY_SIN: sin,
        io.BLOCK_LEN: np.array([block_length(grids)], np.int64),
    }
