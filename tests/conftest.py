"""Tiny random Qwen3-VL checkpoints built with transformers, and bundles exported from them.

Geometries differ where bugs hide: tied vs untied lm_head, GQA ratio (2, 4, 1), DeepStack layer
lists (including an unsorted one), vision depth. Weights use a wide init (std 0.1) so logits are
O(1-10) and a 1e-4 absolute tolerance means something.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from qwen3vl_onnx.calibration import Calibrator
from qwen3vl_onnx.demo.checkpoint import GENERATION, chat_template, make_config
from qwen3vl_onnx.demo.tokenizer import write_tokenizer_files
from qwen3vl_onnx.export.bundle import export
from qwen3vl_onnx.export.options import ExportOptions
from qwen3vl_onnx.shapes.model import unpack

# Small pixel budget so test images give tens of tokens, not hundreds.
TEST_PREPROCESSOR = {
    "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 48},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

# Video: a small clip budget (a frame of 24 merged tokens at most) so test videos cost tens of tokens.
TEST_VIDEO_PREPROCESSOR = {
    **TEST_PREPROCESSOR,
    "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 96},
    "fps": 2,
    "max_frames": 16,
    "max_video_tokens": 24,
    "video_processor_type": "Qwen3VLVideoProcessor",
}

GEOMETRIES = {
    "tied_gqa2": dict(tie=True, heads=4, kv=2, layers=3, depth=3, deepstack=[0, 1]),
    "untied_gqa4": dict(tie=False, heads=4, kv=1, layers=4, depth=4, deepstack=[1, 2, 3]),
    "tied_mha_unsorted": dict(tie=True, heads=2, kv=2, layers=2, depth=3, deepstack=[2, 0]),
}

# Mixture-of-experts geometries (Qwen3VLMoeForConditionalGeneration): top-2 of 4 with a dense layer
# among MoE ones and DeepStack on both kinds, tied; top-4 of 8 on every second layer, untied.
# moe_intermediate_size differs from hidden and from hidden / 2, so each expert layout has shapes of its own.
MOE_GEOMETRIES = {
    "moe_tied_top2of4": dict(tie=True, heads=4, kv=2, layers=3, depth=3, deepstack=[0, 1],
                             moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1])),
    "moe_untied_top4of8_step2": dict(tie=False, heads=4, kv=1, layers=4, depth=4, deepstack=[1, 2, 3],
                                     moe=dict(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=96,
                                              decoder_sparse_step=2)),
}  # fmt: skip


def hf_config(g: dict, max_positions: int = 4096, init: float = 0.1) -> dict:
    """A tiny config of geometry ``g`` (``GEOMETRIES``, ``MOE_GEOMETRIES``), in the released config.json layout."""
    if "moe" in g:
        dense = hf_config({k: v for k, v in g.items() if k != "moe"}, max_positions, init)
        return make_config(
            **{
                **dense,
                "architectures": ["Qwen3VLMoeForConditionalGeneration"],
                "model_type": "qwen3_vl_moe",
                "text_config": {**dense["text_config"], "model_type": "qwen3_vl_moe_text", **g["moe"]},
            }
        )
    return make_config(
        tie_word_embeddings=g["tie"],
        torch_dtype=None,  # transformers builds the test models in float32
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": g["layers"],
                     "num_attention_heads": g["heads"], "num_key_value_heads": g["kv"], "head_dim": 32,
                     "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
                     "max_position_embeddings": max_positions, "initializer_range": init},
        vision_config={"depth": g["depth"], "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "deepstack_visual_indexes": g["deepstack"], "initializer_range": init},
    )  # fmt: skip


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(d, chat_template())
    return d


def build_checkpoint(
    directory: Path, geometry: dict, tokenizer_dir: Path, seed: int = 0, bf16: bool = False, init: float = 0.1,
    released_experts: bool = True,
) -> Path:  # fmt: skip
    """save_pretrained a random transformers model plus tokenizer/processor files. MoE checkpoints
    are then rewritten in the released layout (``released_experts``), which transformers 5 does not
    save: fused experts (E, hidden, 2I) / (E, I, hidden) and ``num_experts`` in the config."""
    import torch
    import transformers

    moe = "moe" in geometry
    prefix = "Qwen3VLMoe" if moe else "Qwen3VL"
    config_class = getattr(transformers, prefix + "Config")
    model_class = getattr(transformers, prefix + "ForConditionalGeneration")
    torch.manual_seed(seed)
    model = model_class(config_class(**hf_config(geometry, init=init)))
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(directory)
    if moe and released_experts:
        to_released_layout(directory)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    (directory / "preprocessor_config.json").write_text(json.dumps(TEST_PREPROCESSOR))
    (directory / "video_preprocessor_config.json").write_text(json.dumps(TEST_VIDEO_PREPROCESSOR))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION))
    return directory


def to_released_layout(directory: Path) -> None:
    """Rewrite a transformers-5-saved MoE checkpoint as Qwen released theirs (see ``build_checkpoint``)."""
    from safetensors.numpy import load_file

    from qwen3vl_onnx.export.weights import save_safetensors

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name] = np.ascontiguousarray(tensors[name].transpose(0, 2, 1))
    save_safetensors(path, tensors, bf16=False)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["text_config"]["num_experts"] = cfg["text_config"].pop("num_local_experts")
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))


class Bundles:
    """Bundles of one checkpoint by export options, each exported on first use and then shared by
    every test that asks for the same options (tests must not change them: copy one first)."""

    def __init__(self, checkpoint: Path, root: Path):
        self.checkpoint, self.root = checkpoint, root
        self._made: dict[tuple, Path] = {}

    def __call__(self, **options) -> Path:
        key = tuple(sorted(options.items()))
        if key not in self._made:
            out = self.root / f"bundle-{len(self._made)}"
            self._made[key] = export(self.checkpoint, out, ExportOptions(**options), calibrator=Calibrator())
        return self._made[key]


class Tiny:
    """A checkpoint, its fp32 bundle, the transformers model loaded from the checkpoint, and
    ``bundle_with(**export_options)`` for its other bundles."""

    def __init__(self, root: Path, name: str, tokenizer_dir: Path, init: float = 0.1):
        import torch
        import transformers

        self.name = name
        geometry = {**GEOMETRIES, **MOE_GEOMETRIES}[name]
        self.checkpoint = build_checkpoint(root / "ckpt", geometry, tokenizer_dir, init=init)
        self.bundle_with = Bundles(self.checkpoint, root)
        self.bundle = self.bundle_with()
        torch.set_grad_enabled(False)
        # The reference model is loaded from what transformers saved, never through its own
        # conversion of the released MoE layout: the bundle and the reference read different files.
        self.reference = self.checkpoint
        if "moe" in geometry:
            self.reference = build_checkpoint(root / "hf", geometry, tokenizer_dir, init=init, released_experts=False)
        prefix = "Qwen3VLMoe" if "moe" in geometry else "Qwen3VL"
        model_class = getattr(transformers, prefix + "ForConditionalGeneration")
        self.model = model_class.from_pretrained(str(self.reference), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_files):
    """Geometry name -> its Tiny, built once per session whichever fixture asks first."""
    built: dict[str, Tiny] = {}

    def get(name: str) -> Tiny:
        if name not in built:
            built[name] = Tiny(tmp_path_factory.mktemp(name), name, tokenizer_files)
        return built[name]

    return get


@pytest.fixture(scope="session", params=list(GEOMETRIES))
def tiny(request, tiny_models) -> Tiny:
    return tiny_models(request.param)


@pytest.fixture(scope="session", params=list(MOE_GEOMETRIES))
def tiny_moe(request, tiny_models) -> Tiny:
    return tiny_models(request.param)


@pytest.fixture(scope="session")
def tiny_one(tiny_models) -> Tiny:
    """One geometry for tests that need a model but not every geometry."""
    return tiny_models("tied_gqa2")


@pytest.fixture(scope="session")
def int8_bundle(tiny_one) -> Path:
    """An int8 bundle with --prefill-int8: int8 vision tower, MatMulNBits decoder, per-row int8 prompt graph."""
    return tiny_one.bundle_with(precision="int8", prefill_int8=True)


CONTEXT = 160  # the short context of the ``setup`` bundle


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Path:
    """A directory with a numpy-built checkpoint (``ckpt``: real tokenizer, no torch needed, a
    context of ``CONTEXT`` tokens), its bundle exported through the CLI (``bundle``) and a picture
    (``img.png``). Shared: tests copy what they damage."""
    import subprocess

    from qwen3vl_onnx.demo.checkpoint import write_checkpoint

    root = tmp_path_factory.mktemp("cli")
    ckpt = write_checkpoint(root / "ckpt", hf_config(GEOMETRIES["tied_gqa2"], max_positions=CONTEXT))
    r = subprocess.run([sys.executable, "-m", "qwen3vl_onnx.cli", "export", str(ckpt), str(root / "bundle")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    picture(64, 40).save(root / "img.png")
    return root


def one_line_error(r, *needles: str) -> str:
    """Assert the CLI's error convention: exit 2 and exactly one ``error: ...`` line naming ``needles``."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def picture(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic noisy picture with a few flat regions (so resizing has edges to get right)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    arr[: height // 3, : width // 2] = (200, 30, 30, 255)
    img = Image.fromarray(arr, "RGBA")
    return img if mode == "RGBA" else img.convert(mode)


def make_video(path: Path, frames: int, fps: float, width: int, height: int, codec: str = "libx264", seed: int = 0,
               keyint: int = 12, faststart: bool = False) -> Path:  # fmt: skip
    """Encode a clip with PyAV: a blocky random picture scrolling one block per frame (so every frame
    differs and resizing has edges), ``codec`` libx264 (lossy H.264, B-frames) or mpeg4, ffv1...;
    ``faststart``: an MP4 with its index at the front (as made for the web)."""
    from fractions import Fraction

    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + frames + 1, 3), dtype=np.uint8)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if codec == "ffv1" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "30", "g": str(keyint)}
        for i in range(frames):
            img = np.kron(base[:, i : i + width // 8 + 1], np.ones((8, 8, 1), np.uint8))[:height, :width]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in this process: the same ``main`` a user's command reaches, without the second
    or so a fresh interpreter takes to import numpy and ONNX Runtime. For checks of exit status and
    output; tests of what only a real process shows (stdin, imports, streaming) use ``cli``."""
    from qwen3vl_onnx.cli import main

    def run(*args: str) -> SimpleNamespace:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, --version, usage errors
            code = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture
def cli():
    """Run the CLI in a subprocess, as a user would."""
    import subprocess

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "qwen3vl_onnx.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
        )

    return run


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Bundles]:
    """The unpacked trained shapes checkpoint and its bundles by export options (fp32: ``bundles()``),
    made once per test module."""
    root = tmp_path_factory.mktemp("shapes")
    ckpt = unpack(root / "ckpt")
    return ckpt, Bundles(ckpt, root)


class Server:
    """A ``qwen3vl-onnx serve`` process on a free loopback port (``url``), stopped by ``close``."""

    def __init__(self, bundle: Path, *flags: str, api_key: str | None = "test-key", timeout: float = 120):
        import socket
        import subprocess
        import tempfile
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.api_key = f"http://127.0.0.1:{port}", api_key
        self.log = tempfile.TemporaryFile("w+")
        key = ["--api-key", api_key] if api_key else []
        self.proc = subprocess.Popen([sys.executable, "-m", "qwen3vl_onnx.cli", "serve", str(bundle), "--port", str(port),
                                      "--model-name", "tiny", *key, *flags], stdout=self.log, stderr=self.log)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"server did not come up: {self.output()[-2000:]}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.proc.kill()
        self.log.close()


def transformers_prompt_ids(processor, messages, videos, tools=None):
    """transformers' prompt ids for ``messages`` (images inline, ``videos`` as (path, fps) in order, ``tools``)."""
    from transformers.video_utils import load_video

    frames, metas = [], []
    for path, fps in videos:

        def sample(metadata, fps=fps, **_):
            return processor.video_processor.sample_frames(metadata, fps=fps)

        v, meta = load_video(str(path), backend="pyav", sample_indices_fn=sample)
        frames.append(v)
        metas.append(meta)
    images = [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
    template = [{**m, "content": [{"type": p["type"]} if p["type"] != "text" else p for p in m["content"]]}
                if isinstance(m["content"], list) else m for m in messages]  # fmt: skip
    text = processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False, tools=tools)
    out = processor(text=[text], images=images or None, videos=frames or None, video_metadata=metas or None,
                    do_sample_frames=False, cap_pixels_per_frame=True, return_tensors="np")  # fmt: skip
    return out["input_ids"][0].tolist()
