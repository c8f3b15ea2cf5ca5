"""3-D MRoPE position ids for a prompt, as transformers' ``Qwen3VLModel.get_rope_index``.

Text tokens advance all three axes together. A run of image (or video-frame) pad tokens is laid out
on its merged grid: t stays at the start position, h and w count rows and columns from it, and the
next text token starts ``max(h, w)`` later. Videos are split into single frames (t = 1 each), as
Qwen3-VL separates frames with timestamps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Grid = tuple[int, int, int]


def rope_index(
    input_ids: Sequence[int],
    image_token_id: int,
    video_token_id: int,
    image_grids: Sequence[Grid] = (),
    video_grids: Sequence[Grid] = (),
    merge: int = 2,
    start: int = 0,
) -> tuple[np.ndarray, int]:
    """Return position ids (3, len) starting at ``start`` and the delta for decoding: the next
    position is ``start + len + delta``. A continued prompt passes the cache's next position as
    ``start`` and adds the delta to the cache's."""
    ids = np.asarray(input_ids, dtype=np.int64)
    kind = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0))
    grids = {1: iter(image_grids), 2: iter((1, h, w) for t, h, w in video_grids for _ in range(t))}
    out = np.zeros((3, len(ids)), dtype=np.int64)
    pos, i = start, 0
    while i < len(ids):
        j = i
        while j < len(ids) and kind[j] == kind[i]:
            j += 1
        if kind[i] == 0:
            out[:, i:j] = pos + np.arange(j - i)
            pos += j - i
            i = j
            continue
        # A run of pad tokens may hold several images back to back; consume grid by grid.
        while i < j:
            try:
                t, h, w = next(grids[int(kind[i])])
            except StopIteration:
                raise ValueError("more image/video pad tokens than image/video grids") from None
            gh, gw = h // merge, w // merge
            n = t * gh * gw
            if i + n > j:
                raise ValueError("image/video pad tokens do not match the grids")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            out[:, i : i + n] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos
            pos += max(gh, gw)
            i += n
    delta = int(out.max()) + 1 - start - len(ids) if len(ids) else 0
    return out, delta
