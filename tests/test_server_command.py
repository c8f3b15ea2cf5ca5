"""``qwen3vl-onnx serve`` at start: whatever it could never serve ends in one ``error:`` line and exit
status 2 before the model loads (a busy port ended in 'terminate called without an active
exception', exit 134, in 4 of 7 tries), and a model that fails to load stops the server the same
way instead of leaving it up answering 503s."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import pytest

from .conftest import one_line_error


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen3vl_onnx.cli", "serve", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def last_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, the last line an ``error:`` naming ``needles``, no traceback (the lines before are the log)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in r.stderr and "terminate called" not in r.stderr, r.stderr
    for n in needles:
        assert n in last, last
    return last


def test_a_busy_port_is_one_line_every_time(setup):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for _ in range(3):
            t0 = time.monotonic()
            r = serve(setup / "bundle", "--port", port)
            one_line_error(r, f"cannot listen on 127.0.0.1:{port}", "pick another --port")
            assert time.monotonic() - t0 < 20  # refused before the model loads


@pytest.mark.parametrize("args, says", [
    (["--host", "10.255.255.1"], "cannot listen on 10.255.255.1"),
    (["--host", "no such host!"], "--host 'no such host!' is not an address to listen on"),
    (["--api-key", ""], "--api-key is empty"),
    (["--api-key", "   "], "--api-key is empty"),
    (["--api-key", "a", "--api-key-file", "{key}"], "with --api-key or --api-key-file, not both"),
    (["--api-key-file", "{empty}"], "the API key file is empty"),
    (["--ctx-size", "100000"], "--ctx-size 100000 is over the model's context of 160 tokens"),
])  # fmt: skip
def test_what_it_could_never_serve_is_refused_at_start(setup, tmp_path, args, says):
    (tmp_path / "key").write_text("secret\n")
    (tmp_path / "empty").write_text("\n")
    args = [a.format(key=tmp_path / "key", empty=tmp_path / "empty") for a in args]
    one_line_error(serve(setup / "bundle", *args), says)


def test_slots_beyond_memory_are_refused_at_start(setup, tmp_path):
    """A context the model allows but a KV cache no machine here holds (terabytes): refused by
    name at once, not a server answering every request with a 503."""
    from qwen3vl_onnx.config import BUNDLE_FORMAT_VERSION

    b = shutil.copytree(setup / "bundle", tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    assert m["format_version"] == BUNDLE_FORMAT_VERSION
    m["config"]["text"]["max_position_embeddings"] = 1 << 24
    (b / "manifest.json").write_text(json.dumps(m))
    one_line_error(serve(b, "--parallel", "64", "--ctx-size", str(1 << 24)), "KV cache for --parallel 64", "lower --parallel")


def test_a_model_that_fails_to_load_stops_the_server(setup, tmp_path):
    """The port is open and the log says where; the decoder then fails to load: the process ends
    with that reason in one line and exit 2 instead of serving 503s."""
    b = shutil.copytree(setup / "bundle", tmp_path / "b")
    (b / "decoder.onnx").write_bytes(b"not an onnx graph" * 100)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = serve(b, "--port", port)
    last_line_error(r, "the model failed to load", "decoder.onnx")
    assert f"listening on http://127.0.0.1:{port}" in r.stderr


@pytest.mark.parametrize("command", [["serve", "bundle"], ["batch", "bundle", "out.jsonl"]], ids=["serve", "batch"])
def test_without_the_server_extra_the_command_says_so_in_one_line(monkeypatch, capsys, command):
    """A missing server dependency (uvicorn here) is named in one line, never an ImportError traceback."""
    from qwen3vl_onnx.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{command[0]} needs the server extra" in err[0] and "uvicorn" in err[0], err
