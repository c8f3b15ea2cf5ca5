"""``qwen3vl-onnx bench``: what the command does with its arguments (the measuring lives in run.py and peers.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..export.options import ExportOptions
from ..export.quant import DEFAULT_BLOCK_SIZE


def _given_bundle(bundle: Path) -> dict:
    """What ``bench --bundle`` reports of the bundle it was given, read from its manifest (not from
    the export options on the command line, which describe bundles bench exports itself)."""
    from ..runtime.model import read_manifest

    m = read_manifest(bundle)
    opts = m.get("export_options") or {}
    return {"precision": m.get("precision"), "vision_precision": m.get("vision_precision"),
            "block_size": opts.get("block_size") if m.get("precision") in ("int4", "int8") else None,
            "int8_projections": opts.get("int8_projections") if m.get("precision") == "int4" else None,
            "prefill_int8": bool(m.get("prefill_int8"))}  # fmt: skip


def _kv_cache_of(bundle: Path) -> dict:
    """The bundle's default KV cache as its export chose it (for int8: the float layers kept and the
    agreement check's mean cosine), so each figure says which cache it was measured over."""
    from ..runtime.model import kv_cache_choice, read_manifest

    manifest = read_manifest(bundle)
    kv = manifest.get("kv_cache") or {}
    agreement = kv.get("agreement") or {}
    return {"default": kv_cache_choice(bundle, manifest, None), "float_layers": kv.get("float_layers"),
            "agreement_mean_cosine": agreement.get("mean_cosine")}  # fmt: skip


def run_bench(args: argparse.Namespace, opts: ExportOptions) -> int:
    """Export (or take ``--bundle``), measure ours in a child process, run the peers, write JSON/markdown/chart."""
    from ..config import Qwen3VLConfig, weight_shapes
    from .presets import full_layers
    from .report import chart, markdown
    from .run import child_measure, export_measured, machine, prepare_checkpoint

    if args.kernels:
        return _run_kernels(args)
    asked, opts = opts, opts.resolve()
    args.vision_precision, args.int8_projections = opts.vision_precision, opts.int8_projections
    work, out = Path(args.workdir).expanduser(), Path(args.out)
    if args.layers and args.bundle:
        raise UserError("--layers applies to --shape presets (a given bundle has its own depth)")
    if args.repeat_layers and not args.layers:
        raise UserError("--repeat-layers needs --layers N (it repeats those N layers up to the shape's depth)")
    shape_key = args.shape + (f"-L{args.layers}" if args.layers else "")
    name = shape_key if not args.bundle else Path(args.bundle).name
    if args.bundle:
        given = _given_bundle(Path(args.bundle))
        args.precision, args.vision_precision = given["precision"], given["vision_precision"]
    else:
        given = {"precision": args.precision, "vision_precision": args.vision_precision, "block_size": args.block_size,
                 "int8_projections": list(args.int8_projections), "prefill_int8": args.prefill_int8}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"shape": name, **given, "machine": machine()}
    p8 = "-p8" + ("+".join(args.int8_projections) or "none")  # names the 8-bit choice in file names
    pi8 = "-prefill8" if args.prefill_int8 else ""
    ckpt = None
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        ckpt = prepare_checkpoint(args.shape, work / shape_key, args.layers)
        tag = p8 if args.precision == "int4" else ""
        bundle = work / shape_key / f"bundle-{args.precision}-b{args.block_size}{tag}{pi8}-v{args.vision_precision}"
        print(f"exporting {bundle}", file=sys.stderr)
        result.update(export_measured(ckpt, bundle, asked))
    result["kv_cache"] = _kv_cache_of(bundle)
    if args.video:
        return _run_video(args, result, bundle, ckpt, work / name, out, name)
    if args.constrained:
        from .constrained import constrained_markdown, measure_constrained

        print("constrained decoding: grammar compile, mask per token against decoder steps", file=sys.stderr)
        result["constrained"] = measure_constrained(bundle, repeats=max(args.repeats, 5))
        return _write(out / f"bench-{name}-{args.precision}-constrained", result, constrained_markdown(result))
    if args.batch:
        from .batch import batch_markdown, measure_batch

        print(f"batch: {args.batch} picture requests, a loop of Pipeline.generate then the batch command", file=sys.stderr)
        result["batch"] = measure_batch(bundle, args.batch, args.parallel, ray_actors=args.ray_actors)
        return _write(out / f"bench-{name}-{args.precision}-batch", result, batch_markdown(result))
    if args.profile:
        from .profile import profile_markdown, profile_steps

        print("decoder steps under ONNX Runtime's profiler", file=sys.stderr)
        kv = None if args.kv_cache == "auto" else args.kv_cache
        result["profile"] = profile_steps(bundle, steps=max(args.repeats, 5), kv_cache=kv)
        return _write(out / f"bench-{name}-{args.precision}-profile", result, profile_markdown(result))
    if args.serve or args.soak:
        return _run_serve(args, result, bundle, ckpt, out, name)
    print("measuring qwen3vl-onnx", file=sys.stderr)
    result["ours"] = child_measure(bundle, args.repeats)
    if args.layers:
        from .depth import scaled

        result["scaled"] = scaled(result["ours"], bundle, args.layers, full_layers(args.shape))
    if args.compare:
        if ckpt is None:
            raise UserError("--compare needs --shape (peers run on the same random checkpoint)")
        from .peers import TURN_MIN_PAIRS, run_peers, run_turns

        params = sum(int(np.prod(s)) for s in weight_shapes(Qwen3VLConfig.from_file(ckpt / "config.json")).values())
        result["peers"] = run_peers(ckpt, params, args.repeats, work / shape_key / "peers", args.peers)
        pairs = max(args.repeats, TURN_MIN_PAIRS)
        result["turns"] = run_turns(ckpt, bundle, result["peers"], work / shape_key / "peers", pairs, args.turn_pause)
    if args.repeat_layers:
        from .deepen import measure_full_depth
        from .peers import TURN_MIN_PAIRS

        print(f"measuring {full_layers(args.shape)} layers by repeating the {args.layers} exported", file=sys.stderr)
        peers_dir = work / shape_key / "peers" if args.compare else None
        result["full_depth"] = measure_full_depth(bundle, full_layers(args.shape), args.repeats, peers_dir,
                                                  max(args.repeats, TURN_MIN_PAIRS), args.turn_pause)  # fmt: skip
    block = f"-b{args.block_size}" if not args.bundle and args.block_size != DEFAULT_BLOCK_SIZE else ""
    if not args.bundle and args.int8_projections != ExportOptions(args.precision).resolve().int8_projections:
        block += p8
    stem = out / f"bench-{name}-{args.precision}{block}{'' if args.bundle else pi8}-v{args.vision_precision}"
    beside(stem, ".json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    beside(stem, ".md").write_text(table)
    chart(result, beside(stem, ".png"))
    print(table)
    print(f"wrote {stem}.json, .md, .png", file=sys.stderr)
    return 0


def _run_video(args: argparse.Namespace, result: dict, bundle: Path, ckpt: Path | None, work: Path, out: Path, name: str) -> int:
    """``bench --video``: the clip figures, and with --compare first token against OpenVINO GenAI in turns."""
    from .peers import TURN_MIN_PAIRS, run_video_turns
    from .video import frames_file, run_video, video_markdown

    result["video"] = run_video(bundle, work, args.repeats)
    if args.compare:
        if ckpt is None:
            raise UserError("--compare needs --shape (peers run on the same random checkpoint)")
        frames = frames_file(bundle, work)
        pairs = max(args.repeats, TURN_MIN_PAIRS)
        result["video_turns"] = run_video_turns(ckpt, bundle, work / "peers", frames, pairs, args.turn_pause, args.peers)
    return _write(out / f"bench-{name}-{args.precision}-video", result, video_markdown(result))


def _run_serve(args: argparse.Namespace, result: dict, bundle: Path, ckpt: Path | None, out: Path, name: str) -> int:
    """``bench --serve`` / ``--soak S``: figures of ``qwen3vl-onnx serve`` processes on the bundle;
    with --compare, decode with 1 and 4 streams also in turns with OpenVINO GenAI's continuous batching."""
    from .serve import run_serve_bench, serve_markdown

    if args.compare and ckpt is None:
        raise UserError("--compare needs --shape (peers run on the same random checkpoint)")
    result["serve"] = run_serve_bench(bundle, args.soak)
    if args.compare and not args.soak:
        from .peers import TURN_MIN_PAIRS, run_serve_turns

        pairs = max(args.repeats, TURN_MIN_PAIRS)
        peers_dir = Path(args.workdir).expanduser() / name / "peers"
        result["serve"]["peers"] = run_serve_turns(ckpt, bundle, peers_dir, pairs,
                                                   args.turn_pause, args.peers)  # fmt: skip
    return _write(out / f"bench-{name}-{args.precision}-{'soak' if args.soak else 'serve'}", result, serve_markdown(result))


def beside(stem: Path, ext: str) -> Path:
    """A report file named by its stem: not ``with_suffix``, which would cut a stem with a dot in it
    (the ``0.6b`` preset, a bundle folder named ``model.int4``) at that dot."""
    return stem.with_name(stem.name + ext)


def _write(stem: Path, result: dict, table: str) -> int:
    """The figures as JSON and their report as markdown beside it; the report printed."""
    beside(stem, ".json").write_text(json.dumps(result, indent=1))
    beside(stem, ".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json, .md", file=sys.stderr)
    return 0


def _run_kernels(args: argparse.Namespace) -> int:
    from .kernels import CHAIN_ROWS, kernels_markdown, measure_attention_cases, measure_chain, measure_kernels
    from .run import machine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repeats = max(args.repeats, 3)
    result = {"machine": machine(), "kernels": measure_kernels(repeats), "decode_rows": measure_chain(CHAIN_ROWS, repeats),
              "attention": measure_attention_cases(repeats)}  # fmt: skip
    table = kernels_markdown(result["kernels"], result["machine"], result["attention"], result["decode_rows"])
    (out / "bench-kernels.json").write_text(json.dumps(result, indent=1))
    (out / "bench-kernels.md").write_text(table)
    print(table)
    print(f"wrote {out / 'bench-kernels.json'}, .md", file=sys.stderr)
    return 0
