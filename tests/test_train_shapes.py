"""scripts/train_shapes.py runs: a few steps end to end write a checkpoint and report accuracy."""

from __future__ import annotations

import subprocess
import sys


def test_training_script_smoke(tmp_path):
    args = ["--steps", "2", "--batch", "4", "--dialogues", "2", "--eval", "5", "--out", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "scripts/train_shapes.py", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "o" / "config.json").is_file()
    assert "held-out accuracy" in r.stdout
