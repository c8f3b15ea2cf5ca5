"""Image preprocessing equals transformers' PIL image processor, and token geometry is right."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwen3vl_onnx.errors import UserError
from qwen3vl_onnx.runtime.preprocess import ImageProcessorConfig, preprocess_image, smart_resize

from .conftest import TEST_PREPROCESSOR, picture


def _reference(image, settings):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(**settings)
    out = proc(images=[image], return_tensors="np")
    return out["pixel_values"], [tuple(int(x) for x in g) for g in out["image_grid_thw"]]


RELEASED = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # fmt: skip
CLIP = {**TEST_PREPROCESSOR, "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


@pytest.mark.parametrize(
    "size,mode,settings",
    [
        ((37, 91), "RGB", TEST_PREPROCESSOR),
        ((333, 127), "RGB", TEST_PREPROCESSOR),
        ((250, 251), "L", TEST_PREPROCESSOR),
        ((99, 61), "RGBA", TEST_PREPROCESSOR),
        ((120, 80), "P", TEST_PREPROCESSOR),
        ((517, 389), "RGB", RELEASED),
        ((45, 300), "RGB", CLIP),
    ],
    ids=str,
)
def test_matches_transformers(size, mode, settings):
    img = picture(*size, seed=sum(size), mode="RGBA" if mode == "RGBA" else "RGB")
    if mode in ("L", "P"):
        img = img.convert(mode)
    if mode == "RGBA":
        a = np.asarray(img).copy()
        a[..., 3] = np.linspace(0, 255, a.shape[1], dtype=np.uint8)[None, :]  # real transparency gradient
        img = Image.fromarray(a, "RGBA")
    ref_pv, ref_grids = _reference(img, settings)
    pv, grid = preprocess_image(img, ImageProcessorConfig.from_dict(settings))
    assert [grid] == ref_grids
    assert pv.shape == ref_pv.shape
    np.testing.assert_allclose(pv, ref_pv, atol=1e-5, rtol=0)


def test_numpy_array_and_path_inputs(tmp_path):
    img = picture(70, 50)
    img.save(tmp_path / "x.png")
    cfg = ImageProcessorConfig.from_dict(TEST_PREPROCESSOR)
    a, ga = preprocess_image(np.asarray(img), cfg)
    b, gb = preprocess_image(tmp_path / "x.png", cfg)
    assert ga == gb
    np.testing.assert_array_equal(a, b)


def test_smart_resize_budget():
    h, w = smart_resize(4000, 3000, 32, 65536, 1280 * 32 * 32)
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 1280 * 32 * 32
    h, w = smart_resize(20, 30, 32, 65536, 16777216)
    assert h * w >= 65536
    with pytest.raises(UserError, match="aspect ratio"):
        smart_resize(10, 3000, 32, 65536, 16777216)


def test_bad_images(tmp_path):
    cfg = ImageProcessorConfig()
    with pytest.raises(UserError, match="not found"):
        preprocess_image(tmp_path / "missing.png", cfg)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UserError, match="cannot read image"):
        preprocess_image(tmp_path / "bad.png", cfg)
