"""``qwen3vl-onnx``: export, generate, verify and demo.

Every user-fixable problem surfaces as one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3vl-onnx", description="Run Qwen3-VL on ONNX Runtime.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a checkpoint directory or hub id to a bundle")
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    e.add_argument("--force", action="store_true", help="replace OUT if it exists")

    g = sub.add_parser("generate", help="answer a prompt (with images) from a bundle")
    g.add_argument("bundle")
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", action="append", default=[], help="image path (repeatable, placed before the text)")
    g.add_argument("--system", default=None, help="optional system message")
    _sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    g.add_argument("--threads", type=int, default=None)

    v = sub.add_parser("verify", help="compare a bundle with transformers (needs torch)")
    v.add_argument("checkpoint")
    v.add_argument("bundle")
    v.add_argument("--image", action="append", default=[])
    v.add_argument("--prompt", default="Describe this image.")
    v.add_argument("--steps", type=int, default=8)
    v.add_argument("--tolerance", type=float, default=None)

    d = sub.add_parser("demo", help="build a random-weight model, export it and ask about a sample image")
    d.add_argument("--workdir", default=str(Path.home() / ".cache" / "qwen3vl-onnx" / "demo"))
    d.add_argument("--rebuild", action="store_true")
    d.add_argument("--prompt", default="What shapes are in this picture?")
    d.add_argument("--max-new-tokens", type=int, default=24)
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

    pipe = Pipeline.from_bundle(args.bundle, threads=args.threads)
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


def _demo(args: argparse.Namespace) -> int:
    import shutil
    import time

    from .demo.checkpoint import sample_image_path, write_checkpoint
    from .export.bundle import export
    from .runtime.generate import Pipeline

    work = Path(args.workdir).expanduser()
    ckpt, bundle = work / "checkpoint", work / "bundle"
    if args.rebuild:
        shutil.rmtree(work, ignore_errors=True)
    if not (ckpt / "model.safetensors").is_file():
        print(f"building a random-weight Qwen3-VL checkpoint in {ckpt}", file=sys.stderr)
        write_checkpoint(ckpt)
    if not (bundle / "manifest.json").is_file():
        t0 = time.perf_counter()
        export(ckpt, bundle, force=True)
        print(f"exported {bundle} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    pipe = Pipeline.from_bundle(bundle)
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


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    r = verify(args.checkpoint, args.bundle, args.image, args.prompt, args.steps, args.tolerance)
    print(f"prefill max |dlogit| {r.prefill_max_abs:.3e}")
    print(f"decode  max |dlogit| {r.decode_max_abs:.3e} over {r.tokens_total} steps")
    print(f"greedy tokens agree  {r.tokens_agree}/{r.tokens_total}")
    print(("PASS" if r.ok else "FAIL") + f" (tolerance {r.tolerance:g})")
    return 0 if r.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "export":
            from .export.bundle import export

            out = export(args.checkpoint, args.out, args.precision, args.force)
            print(f"wrote {out}")
            return 0
        return {"generate": _generate, "demo": _demo, "verify": _verify}[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
