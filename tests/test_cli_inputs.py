"""What a new user types wrong or asks for first: every numeric option validated in one line, help
that describes every argument, --version, a prompt from stdin, the packaged model exported by name,
huge images, and the messages for missing torch or a broken bundle."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import warnings

import pytest
from PIL import Image

from qwen3vl_onnx import Pipeline, __version__
from qwen3vl_onnx.cli import _parser
from qwen3vl_onnx.errors import UserError
from qwen3vl_onnx.runtime.preprocess import MAX_IMAGE_PIXELS, ImageProcessorConfig, preprocess_image

from .conftest import one_line_error


@pytest.mark.parametrize(
    "flag, value, says",
    [("--max-new-tokens", "-1", "max_new_tokens must be an integer >= 1, got -1"),
     ("--max-new-tokens", "0", "max_new_tokens must be an integer >= 1, got 0"),
     ("--temperature", "-1", "temperature must be a number >= 0"),
     ("--temperature", "nan", "temperature must be a number >= 0"),
     ("--top-p", "2", "top_p must be in (0, 1], got 2.0"),
     ("--top-p", "0", "top_p must be in (0, 1], got 0.0"),
     ("--top-k", "-5", "top_k must be an integer >= 0"),
     ("--seed", "-3", "seed must be an integer >= 0"),
     ("--threads", "0", "argument --threads: must be >= 1, got 0"),
     ("--top-k", "many", "argument --top-k: invalid int value")],
)  # fmt: skip
def test_generate_refuses_bad_numbers_in_one_line(run_cli, setup, flag, value, says):
    one_line_error(run_cli("generate", setup / "bundle", "--prompt", "hi", flag, value), says)


@pytest.mark.parametrize(
    "args, says",
    [(["export", "CKPT", "OUT", "--block-size", "100"], "argument --block-size: must be a power of two, got 100"),
     (["export", "CKPT", "OUT", "--block-size", "8"], "argument --block-size: must be >= 16, got 8"),
     (["verify", "CKPT", "B", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
     (["verify", "CKPT", "B", "--min-cosine", "1.5"], "argument --min-cosine: a cosine is at most 1"),
     (["verify", "CKPT", "B", "--tolerance", "-1"], "argument --tolerance: must be a positive number"),
     (["demo", "--questions", "0"], "argument --questions: must be >= 1"),
     (["bench", "--repeats", "0"], "argument --repeats: must be >= 1"),
     (["eval", "B", "-n", "-2"], "argument -n: must be >= 1"),
     (["export", "CKPT"], "the following arguments are required: out"),
     # counts bounded by what the machine or the task can use (100000 threads ran for 10 minutes at
     # 16.7 GB; 3000000000 was a pybind TypeError traceback; a 4096 block took 6.2 GB for 22 MB)
     (["generate", "B", "--prompt", "x", "--threads", "100000"], "argument --threads: must be <= {cores} (the cores"),
     (["generate", "B", "--prompt", "x", "--threads", "3000000000"], "argument --threads: must be <= {cores}"),
     (["chat", "B", "--threads", "99999999999999999999"], "argument --threads: must be <= {cores}"),
     (["serve", "B", "--threads", "99999999999999999999"], "argument --threads: must be <= {cores}"),
     (["serve", "B", "--port", "99999999999999999999"], "argument --port: must be <= 65535"),
     (["serve", "B", "--port", "0"], "argument --port: must be >= 1"),
     (["serve", "B", "--parallel", "100000"], "argument --parallel: must be <= 256"),
     (["serve", "B", "--max-video-frames", "5000"], "argument --max-video-frames: must be <= 768"),
     (["export", "CKPT", "OUT", "--block-size", "4096"], "argument --block-size: must be <= 256"),
     (["verify", "CKPT", "B", "--steps", "100000"], "argument --steps: must be <= 1024"),
     (["demo", "--questions", "100000"], "argument --questions: must be <= 100"),
     (["bench", "--repeats", "100000"], "argument --repeats: must be <= 100"),
     (["bench", "--soak", "1e9"], "argument --soak: must be <= 86400 (a day)"),
     (["eval", "B", "-n", "100000000"], "argument -n: must be <= 10000"),
     (["generate", "B", "--prompt", "x", "--logprobs", "50"], "argument --logprobs: must be <= 20")],
)  # fmt: skip
def test_other_commands_refuse_bad_numbers_before_doing_anything(run_cli, tmp_path, args, says):
    from qwen3vl_onnx.cli_args import usable_cores

    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    one_line_error(run_cli(*args), says.format(cores=usable_cores()))
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    "kwargs, says",
    [({"max_new_tokens": -1}, "max_new_tokens"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
     ({"temperature": -0.1}, "temperature"), ({"temperature": float("inf")}, "temperature"), ({"top_p": 1.01}, "top_p"),
     ({"top_k": -1}, "top_k"), ({"seed": -1}, "seed"), ({"top_k": True}, "top_k")],
)  # fmt: skip
def test_pipeline_generate_validates_the_same(setup, kwargs, says):
    pipe = Pipeline.from_bundle(setup / "bundle")
    with pytest.raises(UserError, match=says):
        pipe.generate([{"role": "user", "content": "hi"}], **kwargs)


def test_help_describes_every_argument_and_shows_defaults(run_cli):
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.dest} has no help text"
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for needle in ("bundle directory written by export", "'-' reads it from standard input", "(default: 256)",
                   "sampling seed", "ONNX Runtime intra-op threads"):  # fmt: skip
        assert needle in text, needle
    assert "(default: 128)" in " ".join(run_cli("export", "--help").stdout.split())


def test_version(run_cli):
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"qwen3vl-onnx {__version__}"


def test_prompt_from_stdin(setup):
    """``--prompt -`` reads the prompt from standard input: the same prompt as passing it inline,
    with one trailing newline dropped as a shell's $(...) does (echo's newline changed the answer)."""

    def prompt_ids(prompt: str, stdin: str | None = None) -> list[int]:
        cmd = [sys.executable, "-m", "qwen3vl_onnx.cli", "generate", str(setup / "bundle"), "--prompt", prompt,
               "--max-new-tokens", "1", "--temperature", "0", "--json", "--logprobs", "5"]  # fmt: skip
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        return [out["prompt_tokens"], out["logprobs"]]  # the first token's distribution: a fingerprint of the prompt

    text = "Tell me about the three shapes,\nline by line."
    inline = prompt_ids(text)
    assert prompt_ids("-", text) == prompt_ids("-", text + "\n") == inline != prompt_ids("x")  # printf / echo


def test_one_token_answer_reports_no_decode_rate(run_cli, setup):
    r = run_cli("generate", setup / "bundle", "--prompt", "hi", "--max-new-tokens", "1", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    stats = r.stderr.strip().splitlines()[-1]
    assert stats.startswith("[") and "1 new tokens" in stats and "decode" not in stats
    r = run_cli("generate", setup / "bundle", "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "0", "--ignore-eos")
    assert "decode " in r.stderr and "decode 0.0" not in r.stderr


def test_verify_without_torch_is_one_line(setup):
    code = ("import sys; sys.modules['torch'] = None\n"  # what an install without the torch extra sees
            "from qwen3vl_onnx.cli import main\n"
            f"sys.exit(main(['verify', {str(setup / 'ckpt')!r}, {str(setup / 'bundle')!r}]))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    one_line_error(r, "verify needs torch and transformers", "pip install")


def test_bundle_without_tokenizer_is_one_line(run_cli, setup, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(setup / "bundle", b)
    (b / "tokenizer.json").unlink()
    one_line_error(run_cli("generate", b, "--prompt", "x"), "bundle is incomplete, tokenizer.json is missing")
    (b / "tokenizer.json").write_text("{not json")
    one_line_error(run_cli("generate", b, "--prompt", "x"), "tokenizer.json: not a readable tokenizer")


def test_bundle_without_image_settings_is_refused_and_export_writes_them(run_cli, setup, tmp_path):
    """Without preprocessor_config.json a bundle would size pictures by other settings than its
    model's and answer differently without a word (the shapes demo said 'two' for 'three'): it is
    refused. A checkpoint that ships none gets Qwen3-VL's released settings, said at export."""
    from qwen3vl_onnx.config import RELEASED_IMAGE_PROCESSOR
    from qwen3vl_onnx.runtime.preprocess import ImageProcessorConfig

    b = shutil.copytree(setup / "bundle", tmp_path / "b")
    (b / "preprocessor_config.json").unlink()
    one_line_error(run_cli("generate", b, "--prompt", "x"), "bundle is incomplete, preprocessor_config.json is missing")
    (b / "preprocessor_config.json").write_text("[1, 2")
    one_line_error(run_cli("generate", b, "--prompt", "x"), "preprocessor_config.json: not a readable image processor config")
    ckpt = shutil.copytree(setup / "ckpt", tmp_path / "ckpt")
    (ckpt / "preprocessor_config.json").unlink()
    r = run_cli("export", ckpt, tmp_path / "out")
    assert r.returncode == 0 and "has no preprocessor_config.json" in r.stderr, r.stderr
    written = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert written == RELEASED_IMAGE_PROCESSOR and ImageProcessorConfig.from_dict(written) == ImageProcessorConfig()


def test_packaged_shapes_model_exports_by_name_and_by_path(run_cli, tmp_path):
    from qwen3vl_onnx.shapes.model import packaged_checkpoint

    r = run_cli("export", "shapes", tmp_path / "by-name")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "by-name" / "manifest.json").read_text())
    assert "tokenizer.json" in manifest["files"] and manifest["config"]["text"]["num_hidden_layers"] == 6
    r = run_cli("export", packaged_checkpoint(), tmp_path / "by-path")
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("by-name", "by-path"))
    assert a["files"] == b["files"]
    assert (tmp_path / "by-name" / "decoder.onnx.data").read_bytes() == (tmp_path / "by-path" / "decoder.onnx.data").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by-name", "by-path"]  # no unpacked checkpoint left behind


def test_large_images_are_read_without_pillows_warning_and_huge_ones_refused(tmp_path):
    """A 90-megapixel file (over Pillow's bomb-warning size) is read and resized quietly; one over
    ``MAX_IMAGE_PIXELS`` is refused in one line naming the limit, before its pixels are decoded."""
    cfg = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 64)
    big, huge = tmp_path / "big.png", tmp_path / "huge.png"
    Image.new("1", (9500, 9500), 1).save(big)  # 90.25 MP: Pillow warns above 89.48 MP
    Image.new("1", (13500, 13500)).save(huge)  # 182 MP: over MAX_IMAGE_PIXELS (179 MP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patches, grid = preprocess_image(big, cfg)
    assert grid == (1, 4, 4) and patches.shape[0] == 16
    assert 13500 * 13500 > MAX_IMAGE_PIXELS > 9500 * 9500
    with pytest.raises(UserError, match=r"huge.png: image has over 179 million pixels; downscale it first"):
        preprocess_image(huge, cfg)
