"""Smoke run of ``qwen3vl-onnx bench`` on the tiny preset: every figure present, outputs written."""

from __future__ import annotations

import json

import pytest

from qwen3vl_onnx.bench.presets import preset_config
from qwen3vl_onnx.config import Qwen3VLConfig
from qwen3vl_onnx.export.defaults import int8_projections

P8 = "+".join(int8_projections()) or "none"  # the int4 bundle name's 8-bit tag on this CPU


@pytest.fixture(scope="module")
def bench_workdir(tmp_path_factory):
    """One bench work directory for the module: the random tiny checkpoint is written once (bundles
    are exported again by each run, as the bench always does)."""
    return tmp_path_factory.mktemp("bench-work")


def test_presets_are_the_released_shapes():
    four = Qwen3VLConfig.from_dict(preset_config("4b"))
    assert (four.text.hidden_size, four.text.num_hidden_layers, four.text.intermediate_size) == (2560, 36, 9728)
    assert four.tie_word_embeddings and four.vision.deepstack_visual_indexes == (5, 11, 17)
    eight = Qwen3VLConfig.from_dict(preset_config("8b"))
    assert not eight.tie_word_embeddings and eight.vision.hidden_size == 1152 and eight.text.mrope_section == (24, 20, 20)


def _check_ours(res: dict, stem, prefill_int8: bool) -> None:
    """What every bench run on the tiny int4 preset must have written: all our figures, export
    figures, the chosen options, the chart and the table."""
    assert res["prefill_int8"] is prefill_int8
    ours = res["ours"]
    for key in (
        "vision_448_s",
        "vision_896_s",
        "prefill_32_tok_s",
        "prefill_256_tok_s",
        "ttft_448_s",
        "decode_tok_s",
        "second_turn_ttft_s",
        "second_turn_recomputed_ttft_s",
    ):
        assert ours[key]["median"] > 0, key
    assert ours["vision_448_tokens"] == 196 and ours["vision_896_tokens"] == 784
    assert res["export_s"] > 0 and res["export_peak_rss_gb"] > 0 and ours["peak_rss_gb"] > 0
    assert res["block_size"] == 128 and res["int8_projections"] == list(int8_projections())
    assert stem.with_suffix(".png").stat().st_size > 1000
    assert "decode (tok/s)" in stem.with_suffix(".md").read_text()
    assert "second turn about a 448x448 picture: first token (s)" in stem.with_suffix(".md").read_text()
    # the default cache as the export's agreement check chose it, named beside the figures
    kv = res["kv_cache"]
    assert kv["default"] == "int8" and kv["float_layers"] >= 1 and kv["agreement_mean_cosine"] >= 0.999, kv
    assert f"int8 KV cache ({kv['float_layers']} float layers, logit cosine" in stem.with_suffix(".md").read_text()


def test_bench_exports_with_the_options_as_asked(monkeypatch, tmp_path):
    """The bench's export is asked what the user asked: a cache left to "auto" stays "auto", so the
    export's agreement check picks the default cache the bench then measures; resolved options
    would name int8 and skip that choice."""
    from qwen3vl_onnx.bench import run
    from qwen3vl_onnx.export.options import ExportOptions

    commands = []
    monkeypatch.setattr(run, "run_measured", lambda cmd, what: commands.append(cmd) or {})
    run.export_measured(tmp_path / "ckpt", tmp_path / "b", ExportOptions(precision="int4"))
    run.export_measured(tmp_path / "ckpt", tmp_path / "b", ExportOptions(precision="int4", kv_cache="int8", int8_projections=()))
    auto, named = commands
    assert auto[auto.index("--kv-cache") + 1] == "auto" and "--int8-projections" not in auto
    assert named[named.index("--kv-cache") + 1] == "int8" and named[named.index("--int8-projections") + 1] == "none"


def test_bench_tiny_prefill_int8_and_bundle(cli, tmp_path, bench_workdir):
    """bench --prefill-int8 exports and measures the prompt graph; bench --bundle then reads that
    choice from the bundle's manifest, and names its reports after the bundle's folder, dots and all.
    (The plain int4 run is checked by the --compare test.)"""
    r = cli("bench", "--shape", "tiny", "--precision", "int4", "--prefill-int8", "--repeats", "1", "--workdir", bench_workdir,
            "--out", tmp_path / "o")  # fmt: skip
    assert r.returncode == 0, r.stderr
    stem = tmp_path / "o" / "bench-tiny-int4-prefill8-vint8"
    _check_ours(json.loads(stem.with_suffix(".json").read_text()), stem, True)
    bundle = bench_workdir / "tiny" / f"bundle-int4-b128-p8{P8}-prefill8-vint8"
    assert (bundle / "decoder_prefill.onnx").is_file()
    dotted = tmp_path / "model.v2"  # a dot in the name must not cut the report's file names
    dotted.symlink_to(bundle)
    r = cli("bench", "--bundle", dotted, "--repeats", "1", "--out", tmp_path / "ob")
    assert r.returncode == 0, r.stderr
    reports = sorted(f.name for f in (tmp_path / "ob").iterdir())
    assert reports == [f"bench-model.v2-int4-vint8.{e}" for e in ("json", "md", "png")], reports
    res_b = json.loads((tmp_path / "ob" / "bench-model.v2-int4-vint8.json").read_text())
    assert res_b["prefill_int8"] is True and "+ int8 prefill graph" in r.stdout


def test_peak_memory_is_the_childs_own():
    """A child of a process that holds 400 MB reports its own peak, not the parent's (Linux keeps
    ru_maxrss across fork and exec, which once made an 8B bench report 9.4 GB for a 5.8 GB run)."""
    import sys

    from qwen3vl_onnx.bench.procstats import peak_rss_gb
    from qwen3vl_onnx.bench.run import run_measured

    ballast = bytearray(400 << 20)  # zero-filled, so resident
    small = run_measured([sys.executable, "-c", "import time; time.sleep(0.5)"], "idle child")
    big = run_measured([sys.executable, "-c", "import time; b = bytearray(300 << 20); time.sleep(0.5)"], "big child")
    assert small["export_peak_rss_gb"] < 0.1, small
    assert 0.29 < big["export_peak_rss_gb"] < 0.45, big
    assert peak_rss_gb() > 0.39  # the parent's own figure does include its ballast
    del ballast


def test_video_figures_on_a_short_clip(tiny_one, tmp_path):
    """The video bench's measuring functions on a 2-second clip of the bench's kind: every figure
    present and sane, the memory figure's parts, the report renders, and both systems' workers give
    the same frames the preprocessing samples."""
    from qwen3vl_onnx.bench.run import machine
    from qwen3vl_onnx.bench.video import measure_memory, measure_video, sampled_frames, video_markdown, write_clip

    clip = write_clip(tmp_path / "clip.mp4", 2)
    v = measure_video(tiny_one.bundle, clip, 1)
    assert v["frames_sampled"] == 4 and v["grid"][0] == 2 and v["prompt_tokens"] > v["visual_tokens"] > 0
    assert 0 < v["vision_s"]["median"] < v["ttft_s"]["median"]
    mem = measure_memory(tiny_one.bundle, clip)
    assert mem["prompt_tokens"] == v["prompt_tokens"] and mem["peak_rss_gb"] > mem["bundle_gb"] > 0 < mem["kv_cache_gb"]
    frames, fps = sampled_frames(tiny_one.bundle, clip)
    assert frames.shape == (4, 360, 640, 3) and fps == 2
    report = video_markdown({"shape": "tiny", "precision": "fp32", "machine": machine(),
                             "video": {"video_10s": v, "video_60s_memory": mem}})  # fmt: skip
    assert "vision encode" in report and f"{v['prompt_tokens']} prompt tokens" in report


def test_bench_bundle_reports_the_bundles_own_precision(cli, tiny_one, setup, tmp_path):
    """A float bundle given with --bundle is labelled by its manifest (fp32, fp32 vision), not by the
    export options' defaults (int4, int8), in the JSON, the report and the file name; no export was
    timed, so none is reported (it printed 'export nan s'). A bundle whose context is too short for
    the bench's prompts is a one-line error, not the child's traceback."""
    r = cli("bench", "--bundle", tiny_one.bundle, "--repeats", "1", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / f"bench-{tiny_one.bundle.name}-fp32-vfp32.json").read_text())
    assert (res["precision"], res["vision_precision"], res["block_size"], res["int8_projections"]) == ("fp32", "fp32", None, None)
    assert "nan" not in r.stdout and "fp32; bundle given with --bundle (export not measured)" in r.stdout
    assert "int4" not in r.stdout
    r = cli("bench", "--bundle", setup / "bundle", "--repeats", "1", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "context" in r.stderr.splitlines()[-1], r.stderr


def test_bench_batch_against_a_loop(cli, tmp_path, bench_workdir):
    """bench --batch N: the same N picture requests through the batch path and a generate loop, both
    timed, every request answered, most answers the same text (near-ties of batched int4 steps aside)."""
    r = cli("bench", "--shape", "tiny", "--batch", "4", "--parallel", "2", "--workdir", bench_workdir, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "bench-tiny-int4-batch.json").read_text())["batch"]
    assert res["requests"] == 4 and res["failed"] == 0 and res["loop_s"] > 0 and res["batch_s"] > 0
    assert res["same_answers"] >= 2 and "batch" in r.stdout
