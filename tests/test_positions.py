"""3-D MRoPE positions equal transformers' get_rope_index, for images and videos."""

from __future__ import annotations

import numpy as np
import torch

from qwen3vl_onnx.runtime.positions import rope_index

IMG, VID, VS, VE = 151655, 151656, 151652, 151653


def _prompt(segments):
    ids = []
    for s in segments:
        if isinstance(s, tuple):
            kind, (t, h, w) = s
            ids += [VS] + [kind] * (t * h * w // 4) + [VE]
        else:
            ids += list(range(100, 100 + s))
    return ids


def test_matches_transformers(tiny_one):
    image_grids = [(1, 4, 6), (1, 8, 2)]
    video_grids = [(3, 4, 4)]
    # Qwen3-VL writes each video frame as its own <timestamp><vision_start>pads<vision_end> run.
    frames = [s for _ in range(3) for s in (2, (VID, (1, 4, 4)))]
    ids = _prompt([5, (IMG, image_grids[0]), 3, (IMG, image_grids[1]), 4, *frames, 7])
    ids_t = torch.tensor([ids])
    mm = torch.tensor([[1 if i == IMG else 2 if i == VID else 0 for i in ids]])
    ref_pos, ref_delta = tiny_one.model.model.get_rope_index(
        ids_t, mm, image_grid_thw=torch.tensor(image_grids), video_grid_thw=torch.tensor(video_grids)
    )
    pos, delta = rope_index(ids, IMG, VID, image_grids, video_grids)
    np.testing.assert_array_equal(pos, ref_pos[:, 0].numpy())
    assert delta == int(ref_delta[0, 0])


def test_text_only_is_arange():
    pos, delta = rope_index(list(range(10)), IMG, VID)
    assert (pos == np.arange(10)).all() and delta == 0
