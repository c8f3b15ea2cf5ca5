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


def test_existing_out_needs_force_and_force_replaces_only_a_bundle(ckpt, tmp_path):
    """--force swaps an earlier bundle (or fills an empty folder); a folder of other files or a file
    stays as it was (--force onto an unrelated folder once deleted it without a word, onto a file it
    left .NAME.old behind)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export(ckpt, out)
    with pytest.raises(UserError, match="is a folder that is not a bundle .* --force replaces only a bundle"):
        export(ckpt, out, force=True)
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    note = tmp_path / "note.txt"
    note.write_text("also mine")
    with pytest.raises(UserError, match="note.txt: is a file; --force replaces only a bundle"):
        export(ckpt, note, force=True)
    assert note.read_text() == "also mine"
    with pytest.raises(UserError, match=r"note.txt is a file, not a folder"):
        export(ckpt, note / "bundle")
    (tmp_path / "empty").mkdir()
    export(ckpt, tmp_path / "empty", force=True)
    first = export(ckpt, tmp_path / "b")
    stamp = json.loads((first / "manifest.json").read_text())["export_seconds"]
    (first / "stray.txt").write_text("old bundle's")
    export(ckpt, first, force=True)
    assert not (first / "stray.txt").exists() and (first / "manifest.json").is_file()
    assert isinstance(stamp, float) and _leftovers(tmp_path) == []


def test_stale_partials_of_killed_exports_are_cleaned(ckpt, tmp_path):
    """A partial folder whose exporting process is gone (killed with SIGKILL: nothing could clean
    it) is removed by the next export to the same OUT; one whose process is alive is left alone."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name, pid in ((".out.dead1.partial", gone.stdout.strip()), (".out.live1.partial", str(alive.pid))):
            (tmp_path / name).mkdir()
            (tmp_path / name / bundle_mod.OWNER).write_text(pid)
            (tmp_path / name / "decoder.onnx.data").write_bytes(b"\0" * 1000)
        (tmp_path / ".out.early.partial").mkdir()  # from a version that wrote no owner
        (tmp_path / ".other.x.partial").mkdir()  # another bundle's: not ours to judge
        export(ckpt, tmp_path / "out")
        assert sorted(_leftovers(tmp_path)) == [".other.x.partial", ".out.live1.partial"]
        assert bundle_mod.OWNER not in json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]
    finally:
        alive.kill()


def test_sigterm_during_export_leaves_nothing(ckpt, tmp_path):
    """SIGTERM is taken as Ctrl-C: the partial bundle is removed, one line, exit 143 (it once left
    .OUT.xxxx.partial folders of 14 MB to 2.6 GB)."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "qwen3vl_onnx.cli", "export", str(ckpt), str(tmp_path / "out")],
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.*.partial")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "export ended before it could be stopped"
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 143 and err.strip().splitlines()[-1] == "error: terminated", (p.returncode, err)
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


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
