"""bench --compare: peers on the same random checkpoint, measured in turns; how a missing or failed
peer is reported. (In its own file so the test runner can run it beside the other bench tests.)"""

from __future__ import annotations

import json

import pytest

from qwen3vl_onnx.export.defaults import int8_projections

from .test_bench import _check_ours


@pytest.fixture(scope="module")
def bench_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-compare-work")


def test_missing_peer_is_skipped_with_how_to_install(monkeypatch, tmp_path):
    from qwen3vl_onnx.bench import peers

    monkeypatch.setattr(peers, "PEERS", {"ghost": peers.Peer("peer_torch", [], ["no_such_module_q3"], "pip install ghost", 0)})
    res = peers.run_peers(tmp_path / "ckpt", 10, 1, tmp_path / "w")
    assert res == {"ghost": {"skipped": "no_such_module_q3 not installed (pip install ghost)"}}


def test_failed_peer_reports_its_error_line_not_backtrace_noise():
    from qwen3vl_onnx.bench.procstats import failure_reason

    native = """loaded
/build/vendor/llama.cpp/ggml/src/ggml.c:2072: GGML_ASSERT(ggml_can_repeat(b, a)) failed
Using host libthread_db library "/lib/x86_64-linux-gnu/libthread_db.so.1".
30	../sysdeps/unix/sysv/linux/wait4.c: No such file or directory.
360	../csu/libc-start.c: No such file or directory.
"""
    assert failure_reason(native).endswith("GGML_ASSERT(ggml_can_repeat(b, a)) failed")
    assert failure_reason("Traceback (most recent call last):\n  x\nValueError: bad shape\n") == "ValueError: bad shape"
    assert failure_reason("just this\n") == "just this" and failure_reason("") == "no output"


def test_bench_compare_runs_peers_on_the_same_weights_and_in_turns(cli, tmp_path, bench_workdir):
    """onnxruntime-genai's builder exports the same random checkpoint and its figures land beside ours
    with ratios; PyTorch bf16 runs too; then PyTorch's vision encode and prefill-256, and
    onnxruntime-genai's prefill-256 and decode, are also measured in turns with ours (each system
    loaded in its own worker), each pair's ratio reaching the table."""
    r = cli("bench", "--shape", "tiny", "--precision", "int4", "--repeats", "1", "--compare", "--peers", "onnxruntime-genai",
            "PyTorch bf16", "--turn-pause", "0", "--workdir", bench_workdir, "--out", tmp_path / "o", timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    stem = tmp_path / "o" / "bench-tiny-int4-vint8"
    res = json.loads(stem.with_suffix(".json").read_text())
    _check_ours(res, stem, False)
    assert not (
        bench_workdir / "tiny" / f"bundle-int4-b128-p8{'+'.join(int8_projections()) or 'none'}-vint8" / "decoder_prefill.onnx"
    ).exists()
    assert list(res["peers"]) == ["PyTorch bf16", "onnxruntime-genai int4 (text)"]
    peer = res["peers"]["onnxruntime-genai int4 (text)"]
    assert "skipped" not in peer and "skipped" not in res["peers"]["PyTorch bf16"], res["peers"]
    for key in ("prefill_32_tok_s", "prefill_256_tok_s", "decode_tok_s"):
        assert peer[key]["median"] > 0, key
    assert peer["convert_s"] > 0 and peer["convert_peak_rss_gb"] > 0 and peer["bundle_gb"] > 0
    md = (tmp_path / "o" / "bench-tiny-int4-vint8.md").read_text()
    assert "ratio vs onnxruntime-genai int4 (text)" in md and "ratio vs PyTorch bf16" in md
    assert list(res["turns"]) == ["PyTorch bf16", "onnxruntime-genai int4 (text)"]
    labels = {"vision_448_s": "vision encode 448x448 (s)", "prefill_256_tok_s": "prefill 256 tokens (tok/s)",
              "decode_tok_s": "decode (tok/s)"}  # fmt: skip
    # PyTorch's worker has no first-token or decode figure, onnxruntime-genai's (text only) no vision
    for peer, tasks in (("PyTorch bf16", ["vision_448_s", "prefill_256_tok_s"]),
                        ("onnxruntime-genai int4 (text)", ["prefill_256_tok_s", "decode_tok_s"])):  # fmt: skip
        turns = res["turns"][peer]
        assert list(turns) == tasks, (peer, turns)
        for task in tasks:
            f = turns[task]
            assert f["pair_ratios"]["n"] == 5 and f["ours"]["n"] == 5 and f["ours"]["median"] > 0 and f["peer"]["median"] > 0
            assert f"{labels[task]}, in turns with {peer}, 5 pairs" in md


def test_turns_report_a_worker_that_dies_with_its_error_line():
    import sys

    from qwen3vl_onnx.bench.turns import take_turns

    ok = [sys.executable, "-c", "from qwen3vl_onnx.bench.procstats import serve_loop; serve_loop({'ttft_448_s': lambda: 1.0})"]
    dead = [sys.executable, "-c", "raise ValueError('no pipeline here')"]
    with pytest.raises(RuntimeError, match="peer exited .*ValueError: no pipeline here"):
        take_turns(ok, dead, ["ttft_448_s"], 1, pause_s=0)
    res = take_turns(ok, ok, ["ttft_448_s"], 2, pause_s=0)["ttft_448_s"]
    assert res["pair_ratios"] == {"median": 1.0, "min": 1.0, "max": 1.0, "n": 2}


def test_serve_decode_in_turns_with_a_peer(tiny_one, monkeypatch, tmp_path):
    """bench --serve --compare: our worker starts a real `serve --parallel 4` on a bundle and answers the
    decode rates of 1 and 4 streaming clients; a peer worker (here a stand-in answering 5 and 12 tok/s,
    as the OpenVINO one is not installed in CI) is asked in turns; the report gives both scalings."""
    import sys

    from qwen3vl_onnx.bench import peers
    from qwen3vl_onnx.bench.serve import _peer_line

    fake = tmp_path / "python"
    rates = "{'decode_1_streams_tok_s': lambda: 5.0, 'decode_4_streams_tok_s': lambda: 12.0}"
    code = f"from qwen3vl_onnx.bench.procstats import serve_loop; serve_loop({rates})"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{code}"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(peers, "openvino_python", lambda workdir: fake)
    monkeypatch.setattr(peers, "command", lambda module, workdir: [str(fake)])
    res = peers.run_serve_turns(tmp_path / "ckpt", tiny_one.bundle, tmp_path, 2, 0, ["f32"], tokens=48)
    assert list(res) == ["OpenVINO GenAI int4 (f32 hint)"]
    t = res["OpenVINO GenAI int4 (f32 hint)"]
    for task in ("decode_1_streams_tok_s", "decode_4_streams_tok_s"):
        assert t[task]["ours"]["n"] == 2 and t[task]["ours"]["min"] > 0, t
        assert t[task]["peer"]["median"] == (5.0 if "1_" in task else 12.0)
    line = _peer_line("OpenVINO GenAI int4 (f32 hint)", t)
    assert "2 pairs" in line and "theirs 2.40x" in line, line
    assert _peer_line("x", {"skipped": "no OpenVINO environment"}) == "x: skipped (no OpenVINO environment)"


def test_serve_rates_count_tokens_while_every_stream_runs():
    """Two streams overlapping from t=1 to t=3: 4 tokens arrive in that window (1.5, 2, 2.5, 3)."""
    from qwen3vl_onnx.bench.serve import rates

    together, overall = rates([[0.0, 1.0, 2.0, 3.0], [1.0, 1.5, 2.5, 5.0]])
    assert together == 4 / 2 and overall == 6 / 5
    # never both at once: the window rate does not exist, the first-to-last one stands for it
    assert rates([[0.0, 1.0], [2.0, 4.0]]) == (2 / 4, 2 / 4)
