"""Graph-level checks from a tiny config, without torch: valid ONNX, nothing shape-specific baked in."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from qwen3vl_onnx.config import Qwen3VLConfig
from qwen3vl_onnx.demo.checkpoint import write_checkpoint
from qwen3vl_onnx.errors import UserError
from qwen3vl_onnx.export.bundle import export
from qwen3vl_onnx.runtime.model import BundleModel
from qwen3vl_onnx.runtime.vision_geometry import block_length, same_length_runs

from .conftest import GEOMETRIES, hf_config


@pytest.fixture(scope="module")
def numpy_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    ckpt = write_checkpoint(root / "ckpt", hf_config(GEOMETRIES["untied_gqa4"]))
    return export(ckpt, root / "bundle")


def test_graphs_are_valid_and_dynamic(numpy_bundle):
    manifest = json.loads((numpy_bundle / "manifest.json").read_text())
    for name, graph in manifest["graphs"].items():
        onnx.checker.check_model(str(numpy_bundle / graph["file"]))
        model = onnx.load(str(numpy_bundle / graph["file"]), load_external_data=False)
        assert model.graph.initializer, name
        for inp in model.graph.input:
            dims = inp.type.tensor_type.shape.dim
            # Every tensor input has a symbolic length: no image size or sequence length baked in.
            if len(dims) >= 2:
                assert any(d.dim_param for d in dims), f"{name}:{inp.name} has a fully static shape"
    assert set(manifest["graphs"]["vision"]["outputs"]) == {"image_embeds", "deepstack_features"}
    assert manifest["precision"] == "fp32" and manifest["config"]["tie_word_embeddings"] is False


def test_vision_graph_runs_any_grid_mix(numpy_bundle):
    m = BundleModel(numpy_bundle)
    cfg = m.config.vision
    for grids in ([(1, 2, 2)], [(1, 2, 30), (1, 30, 2)], [(1, 4, 4), (3, 2, 6), (1, 8, 2)]):
        n = sum(t * h * w for t, h, w in grids)
        emb, ds = m.encode_images(np.zeros((n, cfg.patch_dim), np.float32), grids)
        assert emb.shape == (n // 4, cfg.out_hidden_size)
        assert ds.shape == (len(cfg.deepstack_visual_indexes), n // 4, cfg.out_hidden_size)
        assert np.isfinite(emb).all() and np.isfinite(ds).all()


def test_config_is_the_one_in_the_manifest(numpy_bundle):
    m = BundleModel(numpy_bundle)
    assert m.config == Qwen3VLConfig.from_file(numpy_bundle / "config.json")


def test_vision_calls_group_frames_of_one_size(numpy_bundle):
    """Consecutive images of one frame size share a call (unpadded, unmasked blocks); others split."""
    grids = [(1, 4, 4), (1, 2, 8), (2, 4, 6), (1, 6, 4), (1, 2, 2)]
    assert same_length_runs(grids) == [(0, 2), (2, 4), (4, 5)]
    assert block_length([(2, 4, 6), (1, 6, 4)]) == 24
    with pytest.raises(ValueError, match="one size"):
        block_length([(1, 4, 4), (1, 4, 6)])
    m = BundleModel(numpy_bundle)
    ops = {n.op_type for n in onnx.load(numpy_bundle / "vision.onnx", load_external_data=False).graph.node}
    assert "MultiHeadAttention" in ops
    # one call per run gives the same features as one call per image
    n = [t * h * w for t, h, w in grids]
    pv = np.random.default_rng(0).standard_normal((sum(n), m.config.vision.patch_dim), dtype=np.float32)
    emb, ds = m.encode_images(pv, grids)
    start, singles = 0, []
    for g, k in zip(grids, n, strict=True):
        singles.append(m.encode_images(pv[start : start + k], [g]))
        start += k
    np.testing.assert_allclose(emb, np.concatenate([e for e, _ in singles]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ds, np.concatenate([d for _, d in singles], axis=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("version, says", [(1, "is format 1"), (None, "has no format version")])
def test_old_bundle_format_is_refused(numpy_bundle, tmp_path, version, says):
    old = tmp_path / "old"
    shutil.copytree(numpy_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = version
    if version is None:
        del manifest["format_version"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"{says}.*export the checkpoint again"):
        BundleModel(old)
