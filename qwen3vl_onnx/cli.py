"""``qwen3vl-onnx``: export, generate, verify and demo.

Every user-fixable problem surfaces as one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .errors import UserError
from .export.quant import DEFAULT_BLOCK_SIZE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3vl-onnx", description="Run Qwen3-VL on ONNX Runtime.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a checkpoint directory or hub id to a bundle")
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"])
    e.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="int4/int8 quantization block (power of two >= 16)")
    e.add_argument("--vision-precision", default="auto", choices=["auto", "fp32", "int8"],
                   help="vision tower linear layers (auto: int8 for int4/int8 bundles, else fp32)")  # fmt: skip
    _int8_projections_arg(e)
    _prefill_int8_arg(e)
    e.add_argument("--portable", action="store_true", help="standard ONNX ops only (no ONNX Runtime contrib ops)")
    e.add_argument("--force", action="store_true", help="replace OUT if it exists")

    g = sub.add_parser("generate", help="answer a prompt (with images) from a bundle")
    g.add_argument("bundle")
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", action="append", default=[], help="image path (repeatable, placed before the text)")
    g.add_argument("--system", default=None, help="optional system message")
    _sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--no-prefill-graph", dest="prefill_graph", action="store_false",
                   help="leave a --prefill-int8 bundle's prompt graph unloaded (less memory, slower prompts)")  # fmt: skip

    v = sub.add_parser("verify", help="compare a bundle with transformers (needs torch)")
    v.add_argument("checkpoint")
    v.add_argument("bundle")
    v.add_argument("--image", action="append", default=[])
    v.add_argument("--prompt", default="Describe this image.")
    v.add_argument("--steps", type=int, default=8)
    v.add_argument("--tolerance", type=float, default=None, help="float bundles: max |logit difference| (fp32 1e-3, fp16 5e-2)")
    v.add_argument("--min-cosine", type=float, default=None,
                   help="pass on mean logit cosine instead (default for int8 0.999, int4 0.99)")  # fmt: skip

    d = sub.add_parser("demo", help="export the embedded shapes model and ask it about a fresh picture")
    d.add_argument("--workdir", default=str(Path.home() / ".cache" / "qwen3vl-onnx" / "demo"))
    d.add_argument("--rebuild", action="store_true")
    d.add_argument("--seed", type=int, default=None, help="picture/question seed (default: random)")
    d.add_argument("--questions", type=int, default=4)
    d.add_argument("--random", action="store_true", help="use a random-weight model instead of the trained one")
    d.add_argument("--prompt", default="What shapes are in this picture?", help="question for --random")
    d.add_argument("--max-new-tokens", type=int, default=24)

    b = sub.add_parser("bench", help="speed figures on random weights of a released shape (or a bundle)")
    b.add_argument("--shape", default="4b", choices=["tiny", "2b", "4b", "8b", "32b"])
    b.add_argument("--bundle", default=None, help="measure this bundle instead of a random preset")
    b.add_argument("--precision", default="int4", choices=["fp32", "fp16", "int8", "int4"])
    b.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    b.add_argument("--vision-precision", default="auto", choices=["auto", "fp32", "int8"])
    _int8_projections_arg(b)
    _prefill_int8_arg(b)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--compare", action="store_true", help="also run the peers on the same weights")
    b.add_argument("--peers", nargs="+", metavar="NAME", help="with --compare: only peers whose name contains one of these")
    b.add_argument("--workdir", default=str(Path.home() / ".cache" / "qwen3vl-onnx" / "bench"))
    b.add_argument("--out", default="bench-results")

    ev = sub.add_parser("eval", help="accuracy on the held-out shapes questions, per type")
    ev.add_argument("bundle")
    ev.add_argument("-n", type=int, default=200, help="number of held-out items")
    ev.add_argument("--json", action="store_true")
    return p


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation config)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")


def _generate(args: argparse.Namespace) -> int:
    from .runtime.generate import Pipeline

    pipe = Pipeline.from_bundle(args.bundle, threads=args.threads, prefill_graph=args.prefill_graph)
    content = [{"type": "image", "image": p} for p in args.image] + [{"type": "text", "text": args.prompt}]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": content}]
    stream = pipe.generate(
        messages,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        stream=True,
    )
    for piece in stream:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    res = stream.result
    assert res is not None
    if args.json:
        print(json.dumps(res.to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        t = res.timings
        print(
            f"[{res.prompt_tokens} prompt + {res.completion_tokens} new tokens; first token {t['ttft_s']:.2f}s, "
            f"vision {t['vision_s']:.2f}s, prefill {t['prefill_tok_per_s']:.1f} tok/s, decode {t['decode_tok_per_s']:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def _demo_stamp(random_weights: bool) -> str:
    """Digest of what the cached demo bundle was made from: the weights' source and the exporter.

    Why: the cache outlives upgrades; a bundle from an older checkpoint or exporter would otherwise
    be reused silently (or refused for its format) after ``pip install -U``.
    """
    import hashlib

    from . import demo, export
    from .config import BUNDLE_FORMAT_VERSION
    from .shapes.model import packaged_checkpoint

    h = hashlib.sha256(f"{BUNDLE_FORMAT_VERSION}".encode())
    sources = sorted(Path(export.__file__).parent.glob("*.py"))
    weights = Path(demo.__file__).with_name("checkpoint.py") if random_weights else packaged_checkpoint() / "model.safetensors"
    sources.append(weights)
    for f in sources:
        h.update(f.read_bytes())
    return h.hexdigest()


def _demo_bundle(work: Path, random_weights: bool, rebuild: bool) -> Path:
    """Checkpoint (trained shapes model, or random weights) unpacked and exported under ``work``,
    made again when the package's checkpoint or exporter changed (``_demo_stamp``)."""
    import shutil
    import time

    from .demo.checkpoint import write_checkpoint
    from .export.bundle import export
    from .shapes.model import unpack

    work = work / ("random" if random_weights else "shapes")
    ckpt, bundle, stamp_file = work / "checkpoint", work / "bundle", work / "stamp"
    stamp = _demo_stamp(random_weights)
    if rebuild or (work.exists() and (not stamp_file.is_file() or stamp_file.read_text() != stamp)):
        shutil.rmtree(work, ignore_errors=True)
    if not (ckpt / "model.safetensors").is_file():
        print(f"writing the {'random-weight' if random_weights else 'trained shapes'} checkpoint to {ckpt}", file=sys.stderr)
        write_checkpoint(ckpt) if random_weights else unpack(ckpt)
    if not (bundle / "manifest.json").is_file():
        t0 = time.perf_counter()
        export(ckpt, bundle, force=True)
        print(f"exported {bundle} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    stamp_file.write_text(stamp)
    return bundle


def _demo(args: argparse.Namespace) -> int:
    from .runtime.generate import Pipeline
    from .shapes.model import packaged_checkpoint

    work = Path(args.workdir).expanduser()
    if not args.random and not (packaged_checkpoint() / "model.safetensors").is_file():
        print("the trained shapes checkpoint is not in this installation; using random weights", file=sys.stderr)
        args.random = True
    pipe = Pipeline.from_bundle(_demo_bundle(work, args.random, args.rebuild))
    if not args.random:
        return _demo_shapes(pipe, work, args)
    from .demo.checkpoint import sample_image_path

    image = sample_image_path()
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": args.prompt}]}]
    print(f"user: [image {image.name}] {args.prompt}")
    print("assistant (random weights, so the words mean nothing): ", end="", flush=True)
    stream = pipe.generate(messages, max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True, stream=True)
    for piece in stream:
        print(piece, end="", flush=True)
    res = stream.result
    assert res is not None
    t = res.timings
    print(
        f"\n[{res.prompt_tokens} prompt tokens incl. image, {res.completion_tokens} generated; vision {t['vision_s']:.2f}s, "
        f"first token {t['ttft_s']:.2f}s, decode {t['decode_tok_per_s']:.1f} tok/s]"
    )
    return 0


def _demo_shapes(pipe, work: Path, args: argparse.Namespace) -> int:
    import random

    from .shapes import task

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    right = 0
    for q in range(args.questions):
        item = task.make_item(seed + q, task.KINDS[q % len(task.KINDS)])
        paths = []
        for k, im in enumerate(item.images):
            paths.append(work / f"picture-{q}-{k}.png")
            im.save(paths[-1])
        res = pipe.generate(task.messages(item), max_new_tokens=4, temperature=0.0)
        ok = res.text.strip().lower() == item.answer
        right += ok
        print(f"[{', '.join(p.name for p in paths)}] {item.question}")
        print(f"  model: {res.text.strip()!r:12} expected: {item.answer!r:12} {'ok' if ok else 'WRONG'}")
    print(f"{right}/{args.questions} correct (seed {seed}; pictures in {work})")
    return 0


def _projection_list(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x not in ("", "none"))


def _int8_projections_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--int8-projections", default=None, metavar="LIST", type=_projection_list,
                   help="int4: decoder projections kept at 8 bits, comma-separated from q_proj, k_proj, v_proj, "
                        "o_proj, gate_proj, up_proj, down_proj, lm_head, or none (default: v_proj,lm_head)")  # fmt: skip


def _prefill_int8_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-int8", action="store_true",
                   help="int4/int8: add a prompt graph with int8 GEMMs (faster prefill; "
                        "+1 byte per decoder weight in memory)")  # fmt: skip


def _bundle_has_prefill_graph(bundle: Path) -> bool | None:
    """Whether a bundle given to ``bench --bundle`` was exported with --prefill-int8 (None: unreadable)."""
    try:
        return "decoder_prefill" in json.loads((bundle / "manifest.json").read_text())["graphs"]
    except (OSError, ValueError, KeyError):
        return None  # the bench child reports what is wrong with the bundle


def _bench(args: argparse.Namespace) -> int:
    from .bench.report import chart, markdown
    from .bench.run import child_measure, export_measured, machine, prepare_checkpoint
    from .config import Qwen3VLConfig, weight_shapes
    from .export.bundle import check_prefill_int8, resolve_int8_projections, resolve_vision_precision

    check_prefill_int8(args.precision, args.prefill_int8)
    args.vision_precision = resolve_vision_precision(args.precision, args.vision_precision)
    args.int8_projections = resolve_int8_projections(args.precision, args.int8_projections)
    work, out = Path(args.workdir).expanduser(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.shape if not args.bundle else Path(args.bundle).name
    result: dict = {
        "shape": name,
        "precision": args.precision,
        "vision_precision": args.vision_precision,
        "block_size": None if args.bundle else args.block_size,
        "int8_projections": None if args.bundle else list(args.int8_projections),
        "prefill_int8": _bundle_has_prefill_graph(Path(args.bundle)) if args.bundle else args.prefill_int8,
        "machine": machine(),
    }
    p8 = "-p8" + ("+".join(args.int8_projections) or "none")  # names the 8-bit choice in file names
    pi8 = "-prefill8" if args.prefill_int8 else ""
    ckpt = None
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        ckpt = prepare_checkpoint(args.shape, work)
        tag = p8 if args.precision == "int4" else ""
        bundle = work / args.shape / f"bundle-{args.precision}-b{args.block_size}{tag}{pi8}-v{args.vision_precision}"
        print(f"exporting {bundle}", file=sys.stderr)
        result.update(
            export_measured(
                ckpt, bundle, args.precision, args.block_size, args.vision_precision, args.int8_projections, args.prefill_int8
            )
        )
    print("measuring qwen3vl-onnx", file=sys.stderr)
    result["ours"] = child_measure(bundle, args.repeats)
    if args.compare:
        if ckpt is None:
            raise UserError("--compare needs --shape (peers run on the same random checkpoint)")
        from .bench.peers import TURN_MIN_PAIRS, run_peers, run_turns

        params = sum(int(np.prod(s)) for s in weight_shapes(Qwen3VLConfig.from_file(ckpt / "config.json")).values())
        result["peers"] = run_peers(ckpt, params, args.repeats, work / args.shape / "peers", args.peers)
        pairs = max(args.repeats, TURN_MIN_PAIRS)
        result["turns"] = run_turns(ckpt, bundle, result["peers"], work / args.shape / "peers", pairs)
    block = f"-b{args.block_size}" if not args.bundle and args.block_size != DEFAULT_BLOCK_SIZE else ""
    if not args.bundle and args.int8_projections != resolve_int8_projections(args.precision):
        block += p8
    stem = out / f"bench-{name}-{args.precision}{block}{'' if args.bundle else pi8}-v{args.vision_precision}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    chart(result, stem.with_suffix(".png"))
    print(table)
    print(f"wrote {stem}.json, .md, .png", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .runtime.generate import Pipeline
    from .shapes.evaluate import evaluate

    rep = evaluate(Pipeline.from_bundle(args.bundle), args.n)
    if args.json:
        print(json.dumps({"accuracy": rep.accuracy(), "n": args.n}))
    else:
        print(rep.table())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    r = verify(args.checkpoint, args.bundle, args.image, args.prompt, args.steps, args.tolerance, args.min_cosine)
    print(f"prefill max |dlogit| {r.prefill_max_abs:.3e}")
    print(f"decode  max |dlogit| {r.decode_max_abs:.3e} over {r.tokens_total} steps")
    print(f"greedy tokens agree  {r.tokens_agree}/{r.tokens_total}")
    print(f"logit cosine         mean {r.mean_cosine:.5f} min {min(r.cosines):.5f} over {len(r.cosines)} positions")
    crit = f"mean cosine >= {r.min_mean_cosine:g}" if r.min_mean_cosine is not None else f"tolerance {r.tolerance:g}"
    print(("PASS" if r.ok else "FAIL") + f" ({crit})")
    return 0 if r.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "export":
            from .export.bundle import export

            out = export(
                args.checkpoint, args.out, args.precision, args.force, args.block_size, args.portable,
                args.vision_precision, args.int8_projections, args.prefill_int8,
            )  # fmt: skip
            print(f"wrote {out}")
            return 0
        commands = {"generate": _generate, "demo": _demo, "verify": _verify, "eval": _eval, "bench": _bench}
        return commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
