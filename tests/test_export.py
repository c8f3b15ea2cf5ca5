"""Export is all-or-nothing and reports bad checkpoints in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from qwen3vl_onnx.demo.checkpoint import write_checkpoint
from qwen3vl_onnx.errors import UserError
from qwen3vl_onnx.export import bundle as bundle_mod
from qwen3vl_onnx.export.bundle import export

from .conftest import GEOMETRIES, hf_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("exp") / "ckpt", hf_config(GEOMETRIES["tied_gqa2"]))


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_failure_midway_leaves_nothing(ckpt, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated crash while building the decoder")

    monkeypatch.setattr(bundle_mod, "build_decoder", boom)
    with pytest.raises(RuntimeError):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_existing_out_needs_force(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export(ckpt, out)
    assert (out / "keep.txt").read_text() == "mine"
    export(ckpt, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert _leftovers(tmp_path) == []


def test_sharded_checkpoint(ckpt, tmp_path):
    """Two shards plus an index, as large released checkpoints come."""
    from qwen3vl_onnx.export.weights import Checkpoint, save_safetensors

    d = tmp_path / "sharded"
    shutil.copytree(ckpt, d)
    (d / "model.safetensors").unlink()
    src = Checkpoint(ckpt)
    names = sorted(src)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in halves.items():
        save_safetensors(d / fname, {n: src[n] for n in part})
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    a = export(ckpt, tmp_path / "a")
    b = export(d, tmp_path / "b")
    assert (a / "decoder.onnx.data").read_bytes() == (b / "decoder.onnx.data").read_bytes()
