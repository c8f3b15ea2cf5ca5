"""Vision features of pictures already seen, keyed by content, so a conversation that shows the same
image again (or re-renders its history each turn) does not run the vision tower twice for it."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .model import BundleModel
from .vision_geometry import Grid


class VisionCache:
    """Least-recently-used map from (preprocessed pixels, grid) to (embeddings, DeepStack features)
    of one image or video, at most ``max_entries`` of them. ``misses`` counts tower runs."""

    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: np.ndarray, grid: Grid) -> str:
        h = hashlib.sha256(np.ascontiguousarray(pixels, np.float32).tobytes())
        h.update(repr(tuple(int(x) for x in grid)).encode())
        return h.hexdigest()

    def encode(self, model: BundleModel, pixels: Sequence[np.ndarray], grids: Sequence[Grid]) -> tuple[np.ndarray, np.ndarray]:
        """Features of each (pixels, grid) in order, concatenated as ``BundleModel.encode_images``
        returns them; the ones not cached are encoded together in one call."""
        keys = [self.key(p, g) for p, g in zip(pixels, grids, strict=True)]
        todo = [i for i, k in enumerate(keys) if k not in self._items]
        if todo:
            emb, ds = model.encode_images(np.concatenate([pixels[i] for i in todo]), [grids[i] for i in todo])
            sizes = np.cumsum([0] + [int(np.prod(grids[i])) // model.config.vision.spatial_merge_size**2 for i in todo])
            for j, i in enumerate(todo):
                self._items[keys[i]] = (emb[sizes[j] : sizes[j + 1]], ds[:, sizes[j] : sizes[j + 1]])
            self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        for k in keys:
            self._items.move_to_end(k)
        parts = [self._items[k] for k in keys]
        while len(self._items) > max(self.max_entries, len(set(keys))):
            self._items.popitem(last=False)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts], axis=1)
