"""Write a self-contained bundle directory from a Hugging Face checkpoint.

Layout::

    OUT/
      manifest.json            graph inputs/outputs, dtypes, precision, parsed config, versions
      vision.onnx(.data)       patches -> merged image embeddings + DeepStack features
      decoder.onnx(.data)      embeddings + MRoPE positions + KV cache -> logits
      decoder_prefill.onnx     (--prefill-int8 only) the same decoder with int8 GEMMs, used for prompts
      embed_tokens.npy         token embedding table (memory-mapped at run time)
      tokenizer.json, chat template, preprocessor/video/generation configs, config.json (copied)

Everything is written to a temporary sibling directory that is renamed to OUT only once complete,
so an interrupted export leaves nothing that looks like a bundle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from .. import __version__
from ..config import BUNDLE_FORMAT_VERSION, Qwen3VLConfig, weight_shapes
from ..errors import UserError
from .graph import OPSET, Graph
from .quant import DEFAULT_BLOCK_SIZE
from .text import DEFAULT_INT8_PROJECTIONS, PROJECTIONS, DecoderOptions, build_decoder
from .vision import build_vision
from .weights import Checkpoint

COPIED_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)
PRECISIONS = {"fp32": np.float32, "fp16": np.float16, "int8": np.float32, "int4": np.float32}
BITS = {"int8": 8, "int4": 4}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(source: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded to the local cache."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: checkpoint must be a directory")
        return path
    if not _HUB_ID.match(str(source)) or str(source).startswith((".", "/")):
        raise UserError(f"{path}: checkpoint directory not found")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{source}: not a local directory, and huggingface_hub is not installed to download it") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(str(source), allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: all reported the same way
        raise UserError(f"{source}: not a local directory and download failed ({type(e).__name__})") from None


def _io(values: list[onnx.ValueInfoProto]) -> dict[str, dict]:
    out = {}
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        out[v.name] = {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}
    return out


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety, never a requirement
        return None, lambda: None
    bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, disable=None)
    return bar.update, bar.close


def resolve_vision_precision(precision: str, vision_precision: str = "auto") -> str:
    """ "auto": int8 for int4/int8 bundles, else fp32.

    Why int8 there: at the 4B shape's vision matmuls (784 x 1024 x 4096) DynamicQuantizeMatMul ran
    at 600-660 GOPS on this 2-core AVX512-VNNI machine against 120-130 for fp32 MatMul and 230 for
    MatMulNBits int8 (per-matmul cosine 0.9999); a user who asked for a quantized bundle wants the
    picture encoded fast too. Float bundles keep the reference-exact fp32 tower.
    """
    if vision_precision == "auto":
        return "int8" if precision in BITS else "fp32"
    if vision_precision not in ("fp32", "int8"):
        raise UserError(f"vision precision {vision_precision!r} is not one of auto, fp32, int8")
    return vision_precision


def resolve_int8_projections(precision: str, projections: Sequence[str] | None = None) -> tuple[str, ...]:
    """The decoder projections an int4 bundle keeps at 8 bits, in ``PROJECTIONS`` order.

    None: ``DEFAULT_INT8_PROJECTIONS`` for int4, nothing otherwise; an empty list: all int4.
    """
    if projections is None:
        return DEFAULT_INT8_PROJECTIONS if precision == "int4" else ()
    chosen = set(projections)
    if unknown := sorted(chosen - set(PROJECTIONS)):
        raise UserError(f"unknown projection(s) {', '.join(unknown)}: choose from {', '.join(PROJECTIONS)} or none")
    if chosen and precision != "int4":
        raise UserError(f"8-bit projections apply to int4 bundles only, not {precision}")
    return tuple(k for k in PROJECTIONS if k in chosen)


def check_prefill_int8(precision: str, prefill_int8: bool) -> None:
    """A prefill graph only for quantized bundles (which are never --portable: ``export`` refuses that).

    Why the option exists: MatMulNBits' int8-compute path tops out at ~375-390 GOPS for prompt-sized
    matmuls on this 2-core AVX512-VNNI machine, while MLAS's u8s8 GEMM runs them at 700-760. The
    prefill graph stores every layer projection again as int8 per output channel (its lm_head is
    a second copy of the decode graph's MatMulNBits one, run on the last position only), so prompts
    and image tokens run on the fast GEMM while decode keeps the compact weights. The price is
    memory: ~1 byte per decoder weight on top of the int4 bundle (4B: +3.8 GB). Off by default for
    that reason.
    """
    if not prefill_int8:
        return
    if precision not in BITS:
        raise UserError(f"--prefill-int8 applies to int4/int8 bundles, not {precision}")


def export(checkpoint: str | Path, out: str | Path, precision: str = "fp32", force: bool = False,
           block_size: int = DEFAULT_BLOCK_SIZE, portable: bool = False, vision_precision: str = "auto",
           int8_projections: Sequence[str] | None = None, prefill_int8: bool = False) -> Path:  # fmt: skip
    """Export ``checkpoint`` to a bundle at ``out``; returns the bundle path.

    int4/int8 quantize the decoder's linear layers (and lm_head) for MatMulNBits and store the
    embedding table fp16; int4 keeps ``int8_projections`` at 8 bits (see
    ``resolve_int8_projections``); ``vision_precision`` "auto" then gives the vision tower int8
    weights with dynamically quantized activations (see ``resolve_vision_precision``). ``portable``
    writes standard-ONNX attention instead of ONNX Runtime contrib ops (float precisions only).
    ``prefill_int8`` adds a second decoder graph for prompts (see ``check_prefill_int8``).
    """
    vision_precision = resolve_vision_precision(precision, vision_precision)
    int8_projections = resolve_int8_projections(precision, int8_projections)
    t0 = time.perf_counter()
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if portable and (precision in BITS or vision_precision != "fp32"):
        raise UserError(f"--portable graphs cannot be {precision}: MatMulNBits is an ONNX Runtime contrib op")
    check_prefill_int8(precision, prefill_int8)
    opts = DecoderOptions(
        fused=not portable, bits=BITS.get(precision, 0), block_size=block_size, int8_projections=int8_projections
    )
    out = Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (use --force to replace it)")
    src = resolve_checkpoint(checkpoint)
    cfg = Qwen3VLConfig.from_file(src / "config.json")
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{src}: tokenizer.json is missing")
    weights = Checkpoint(src)
    weights.check(weight_shapes(cfg))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        dtype = PRECISIONS[precision]
        update, close = _progress(cfg.vision.depth, "vision ")
        vg = Graph("qwen3vl_vision", tmp / "vision.onnx", dtype)
        build_vision(vg, cfg.vision, weights, update, int8=vision_precision == "int8", fused=not portable)
        vg.save()
        close()

        def decoder(key: str, label: str, decoder_opts: DecoderOptions) -> Graph:
            update, close = _progress(cfg.text.num_hidden_layers, label)
            g = Graph(f"qwen3vl_{key}", tmp / f"{key}.onnx", dtype)
            ds = len(cfg.vision.deepstack_visual_indexes)
            build_decoder(g, cfg.text, weights, cfg.tie_word_embeddings, ds, decoder_opts, update)
            g.save()
            close()
            return g

        graphs = {"vision": vg, "decoder": decoder("decoder", "decoder", opts)}
        if prefill_int8:
            graphs["decoder_prefill"] = decoder("decoder_prefill", "prefill", dataclasses.replace(opts, int8_rows=True))
        embed = weights["model.language_model.embed_tokens.weight"].astype(np.float16 if precision in BITS else dtype)
        np.save(tmp / "embed_tokens.npy", embed)
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        manifest = {
            "format": "qwen3vl-onnx-bundle",
            "format_version": BUNDLE_FORMAT_VERSION,
            "precision": precision,
            "vision_precision": vision_precision,
            "decoder_options": dataclasses.asdict(opts),
            "prefill_int8": prefill_int8,
            "config": cfg.to_dict(),
            "graphs": {
                key: {"file": g.path.name, "inputs": _io(g.inputs), "outputs": _io(g.outputs)} for key, g in graphs.items()
            },
            "embed_tokens": {"file": "embed_tokens.npy", "dtype": embed.dtype.name, "shape": list(embed.shape)},
            "files": sorted(p.name for p in tmp.iterdir()),
            "versions": {
                "qwen3vl_onnx": __version__,
                "onnx": onnx.__version__,
                "opset": OPSET,
                "checkpoint_transformers": cfg.raw.get("transformers_version"),
            },
            "source": str(checkpoint),
            "export_seconds": round(time.perf_counter() - t0, 2),
        }
        del embed
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary directory
        if out.exists():  # --force: swap only once the new bundle is complete
            old = out.with_name(f".{out.name}.old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
