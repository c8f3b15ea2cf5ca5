"""Write a self-contained bundle directory from a Hugging Face checkpoint.

Layout::

    OUT/
      manifest.json            graph inputs/outputs, dtypes, precision, parsed config, versions
      vision.onnx(.data)       patches -> merged image embeddings + DeepStack features
      decoder.onnx(.data)      embeddings + MRoPE positions + KV cache -> logits
      decoder_prefill.onnx     (--prefill-int8 only) the same decoder with int8 GEMMs, used for prompts
      *.int8kv.onnx            (int8 KV cache) each decoder with an int8 cache, over the same .data
      embed_tokens.npy         float bundles: token embedding table (memory-mapped at run time)
      embed_tokens.data        quantized untied bundles: the table in blocks (tied ones read lm_head's)
      tokenizer.json, chat template, preprocessor/video/generation configs, config.json (copied)

Everything is written to a temporary sibling directory that is renamed to OUT only once complete,
so an interrupted export leaves nothing that looks like a bundle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from .. import __version__
from ..config import BUNDLE_FORMAT_VERSION, RELEASED_IMAGE_PROCESSOR, Qwen3VLConfig, weight_shapes
from ..errors import UserError
from ..shapes.model import PACKAGED_SHAPES, packaged_checkpoint, unpack
from .defaults import cpu_kind
from .graph import OPSET, Graph
from .kv_int8 import (
    AGREEMENT_BAR,
    QUANT_TYPE,
    KVCalibrator,
    agreement_entry,
    float_layer_choices,
    int8_cache_graph,
    scales_from_ranges,
)
from .moe import EXPERT_PROJECTIONS, check_expert_widths, experts_transposed
from .options import ExportOptions
from .quant import quantize
from .text import DecoderOptions, build_decoder
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
# Storage dtype of float weights per precision (int4/int8 store their quantized weights apart).
PRECISIONS = {"fp32": np.float32, "fp16": np.float16, "int8": np.float32, "int4": np.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@contextlib.contextmanager
def open_checkpoint(source: str | Path) -> Iterator[Path]:
    """The checkpoint directory for ``source`` while the block runs: a local directory, a hub id
    (downloaded to the hub cache), or the packaged shapes model (by name or by its installed path),
    which ships without its tokenizer and is unpacked complete into a temporary directory."""
    packaged = packaged_checkpoint()
    is_packaged = str(source) == PACKAGED_SHAPES  # the name, whatever the working directory holds (a folder: ./shapes)
    if is_packaged or (Path(source).is_dir() and Path(source).resolve() == packaged.resolve()):
        with tempfile.TemporaryDirectory(prefix="qwen3vl-shapes-") as tmp:
            try:
                yield unpack(Path(tmp) / "checkpoint")
            except FileNotFoundError as e:
                raise UserError(str(e)) from None
        return
    yield resolve_checkpoint(source)


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


def io_entries(values: list[onnx.ValueInfoProto]) -> dict[str, dict]:
    """A graph's inputs or outputs as the manifest lists them: name -> element type and shape."""
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


def export(checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None, force: bool = False,
           calibrator: KVCalibrator | None = None) -> Path:  # fmt: skip
    """Export ``checkpoint`` (see ``open_checkpoint``) to a bundle at ``out``; returns its path.

    int4/int8 quantize the decoder's linear layers (and lm_head) for MatMulNBits and keep one
    quantized token table (``_token_table``); see ``ExportOptions.resolve`` for the vision tower, the 8-bit projections
    of int4, the KV cache and the prefill graph. An int8 KV cache needs a ``calibrator``
    (``qwen3vl_onnx.calibration.Calibrator()``): it measures the cache's ranges on the bundle as
    written so far (float cache), then how the int8 cache's logits agree with the float one's;
    left to "auto", the bundle runs int8 by default only where they agree (``AGREEMENT_BAR``).
    Nothing is written at ``out`` unless the whole bundle is.
    """
    t0 = time.perf_counter()
    asked = options or ExportOptions()
    opts = asked.resolve()
    if opts.kv_cache == "int8" and calibrator is None:
        raise ValueError("an int8 KV cache needs a calibrator (qwen3vl_onnx.calibration.Calibrator())")
    out = Path(out).expanduser().resolve()
    _check_target(out, force)
    with open_checkpoint(checkpoint) as src:
        cfg = Qwen3VLConfig.from_file(src / "config.json")
        if not (src / "tokenizer.json").is_file():
            raise UserError(f"{src}: tokenizer.json is missing")
        decoder = opts.decoder()
        check_expert_widths(cfg.text, {k: decoder.bits_for(k) for k in EXPERT_PROJECTIONS})
        weights = Checkpoint(src)
        weights.check(weight_shapes(cfg, experts_transposed(weights, cfg.text)))
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{out.parent}: cannot create the folder for the bundle ({e.strerror})") from None
        _remove_stale_partials(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:  # from the first moment the folder exists: a stop (SIGTERM) here removes it too
            (tmp / OWNER).write_text(str(os.getpid()))
            graphs = _write_graphs(tmp, cfg, weights, opts)
            embed_info = _token_table(tmp, cfg, weights, opts, graphs["decoder"])
            for name in COPIED_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
            if not (src / "preprocessor_config.json").is_file():  # the runtime needs one: the released settings
                print(f"note: {checkpoint} has no preprocessor_config.json; the bundle gets Qwen3-VL's released image "
                      "settings", file=sys.stderr)  # fmt: skip
                (tmp / "preprocessor_config.json").write_text(json.dumps(RELEASED_IMAGE_PROCESSOR, indent=1))
            manifest = _manifest(cfg, opts, graphs, embed_info, str(checkpoint), time.perf_counter() - t0)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if opts.kv_cache == "int8":
                assert calibrator is not None
                _add_int8_cache(tmp, manifest, calibrator, forced=asked.kv_cache == "int8")
                manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
            (tmp / OWNER).unlink()
            manifest["files"] = sorted(p.name for p in tmp.iterdir())  # manifest.json included: written above
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


OWNER = ".owner-pid"  # in a partial export: the process writing it (a partial whose writer is gone is stale)
BUNDLE_FORMAT = "qwen3vl-onnx-bundle"


def _check_target(out: Path, force: bool) -> None:
    """Where a bundle may be written: a free path, or with --force an earlier bundle (or an empty
    folder). Anything else there is the user's, and is never deleted."""
    blocker = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{out}: {blocker} is a file, not a folder")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UserError(f"{out}: already exists (use --force to replace a bundle)")
    if out.is_dir() and not out.is_symlink() and (is_bundle(out) or not any(out.iterdir())):
        return
    what = "is a folder that is not a bundle (no qwen3vl-onnx manifest.json)"
    if not out.is_dir() or out.is_symlink():
        what = "is a file"
    raise UserError(f"{out}: {what}; --force replaces only a bundle, so remove it yourself or choose another OUT")


def is_bundle(path: Path) -> bool:
    """Whether ``path`` holds a bundle of this project (its manifest names the format)."""
    try:
        manifest = json.loads((path / "manifest.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT


def _remove_stale_partials(out: Path) -> None:
    """Delete what earlier exports to ``out`` left when they were killed (SIGKILL, power loss):
    partial folders whose writing process is gone. One still being written is left alone."""
    for partial in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        try:
            pid = int((partial / OWNER).read_text())
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # another export is writing it right now
        except (OSError, ValueError):
            pass  # no owner file, or its process has ended
        shutil.rmtree(partial, ignore_errors=True)


def _write_graphs(tmp: Path, cfg: Qwen3VLConfig, weights: Checkpoint, opts: ExportOptions) -> dict[str, Graph]:
    """vision.onnx, decoder.onnx and (--prefill-int8) decoder_prefill.onnx, each saved as built."""
    dtype = PRECISIONS[opts.precision]
    update, close = _progress(cfg.vision.depth, "vision ")
    vg = Graph("qwen3vl_vision", tmp / "vision.onnx", dtype)
    build_vision(vg, cfg.vision, weights, update, int8=opts.vision_precision == "int8", fused=not opts.portable)
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

    graphs = {"vision": vg, "decoder": decoder("decoder", "decoder", opts.decoder())}
    if opts.prefill_int8:
        graphs["decoder_prefill"] = decoder("decoder_prefill", "prefill", opts.decoder(int8_rows=True))
    return graphs


def _token_table(tmp: Path, cfg: Qwen3VLConfig, weights: Checkpoint, opts: ExportOptions, decoder: Graph) -> dict:
    """The token embedding table and its manifest entry (read by ``runtime.token_table``).

    Float bundles store the table as an array (``embed_tokens.npy``). Quantized ones keep it in
    MatMulNBits blocks at lm_head's bits: a tied checkpoint's table *is* the decoder's lm_head
    weight (the entry points into the graph's data file, nothing is stored twice); an untied one
    gets its own (``embed_tokens.data``). Why: a separate fp16 table would be 0.78 GB of a 2.8 GB 4B int4 bundle.
    """
    t = cfg.text
    if not opts.bits:
        embed = weights["model.language_model.embed_tokens.weight"].astype(PRECISIONS[opts.precision])
        np.save(tmp / "embed_tokens.npy", embed)
        return {"kind": "array", "file": "embed_tokens.npy", "dtype": embed.dtype.name, "shape": list(embed.shape)}
    bits = opts.decoder().bits_for("lm_head")
    entry = {"kind": "blocks", "bits": bits, "block_size": opts.block_size, "rows": t.vocab_size, "cols": t.hidden_size}
    if cfg.tie_word_embeddings:
        parts = {key: decoder.stored(f"lm_head.{key}") for key in ("qweight", "scales", "zero_points")}
        if parts["qweight"] is None or parts["scales"] is None:
            raise RuntimeError("the tied lm_head is not a MatMulNBits weight in the decoder's data file")
        return {**entry, "file": decoder.data_name, **parts}
    q = quantize(weights["model.language_model.embed_tokens.weight"], bits, opts.block_size)
    entry["file"] = "embed_tokens.data"
    with open(tmp / "embed_tokens.data", "wb") as f:
        for key, arr in (("qweight", q.packed), ("scales", q.scales), ("zero_points", q.zero_points)):
            entry[key] = None if arr is None else {"offset": f.tell(), "shape": list(arr.shape)}
            if arr is not None:
                f.write(np.ascontiguousarray(arr).tobytes())
                f.write(b"\0" * (-f.tell() % 64))  # each part starts aligned for its dtype
    return entry


def _add_int8_cache(tmp: Path, manifest: dict, calibrator: KVCalibrator, forced: bool) -> None:
    """Each decoder graph's int8-cache twin (``KEY.int8kv.onnx``), recorded in ``manifest`` with its
    agreement check; the default unless it misses the bar and int8 was not asked for (``forced``)."""
    print("measuring the KV cache's ranges", file=sys.stderr)
    scales = scales_from_ranges(calibrator.ranges(tmp))
    tried: dict[int, list[float]] = {}
    for floats in float_layer_choices(len(scales)):  # the fewest float layers that meet the bar
        for key in [k for k in manifest["graphs"] if k.startswith("decoder") and not k.endswith("_int8kv")]:
            g = int8_cache_graph(tmp / f"{key}.onnx", tmp / f"{key}.int8kv.onnx", scales, float_layers=floats).graph
            manifest["graphs"][f"{key}_int8kv"] = {"file": f"{key}.int8kv.onnx", "inputs": io_entries(list(g.input)),
                                                   "outputs": io_entries(list(g.output))}  # fmt: skip
        print(f"checking the int8 KV cache ({floats} first layer(s) float) against the float one", file=sys.stderr)
        tried[floats] = calibrator.agreement(tmp, manifest["graphs"]["decoder_int8kv"]["file"])
        if np.mean(tried[floats]) >= AGREEMENT_BAR:
            break
    check = agreement_entry(tried)
    meets = check["mean_cosine"] >= AGREEMENT_BAR
    said = (f"int8 KV cache ({floats} first layer(s) float): logit cosine {check['mean_cosine']:.5f} against the "
            f"float cache (mean of {check['conversations']} calibration conversations, lowest {check['min_cosine']:.5f}; "
            f"bar {AGREEMENT_BAR})")  # fmt: skip
    if meets:
        print(f"{said}: the bundle runs it by default", file=sys.stderr)
    elif forced:
        print(f"note: {said}: below the bar, but the default as --kv-cache int8 asks", file=sys.stderr)
    else:
        print(f"note: {said}: below the bar, so the bundle runs its float cache by default "
              "(--kv-cache int8 at run time chooses the int8 one)", file=sys.stderr)  # fmt: skip
    manifest["kv_cache"] = {"default": "int8" if meets or forced else "fp32", "quant_type": QUANT_TYPE,
                            "channels_equalized": QUANT_TYPE == "PER_TENSOR", "float_layers": floats,
                            "agreement": check}  # fmt: skip


def _manifest(cfg: Qwen3VLConfig, opts: ExportOptions, graphs: dict[str, Graph], embed: dict, source: str,
              seconds: float) -> dict:  # fmt: skip
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "precision": opts.precision,
        "vision_precision": opts.vision_precision,
        "export_options": dataclasses.asdict(opts),
        "decoder_options": dataclasses.asdict(opts.decoder()),
        "prefill_int8": opts.prefill_int8,
        "kv_cache": {"default": "fp32"},
        "defaults_for_cpu": cpu_kind(),  # the kind whose measured defaults filled what was not asked
        "config": cfg.to_dict(),
        "graphs": {
            key: {"file": g.path.name, "inputs": io_entries(g.inputs), "outputs": io_entries(g.outputs)}
            for key, g in graphs.items()
        },
        "embed_tokens": embed,
        "versions": {
            "qwen3vl_onnx": __version__,
            "onnx": onnx.__version__,
            "opset": OPSET,
            "checkpoint_transformers": cfg.raw.get("transformers_version"),
        },
        "source": source,
        "export_seconds": round(seconds, 2),
    }


def _publish(tmp: Path, out: Path) -> None:
    """Give the finished bundle its name; with --force, swap only once the new one is complete."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary directory
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # what a replace killed between its two renames left
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
