"""``qwen3vl-onnx``: export, generate, verify and demo.

Every user-fixable problem surfaces as one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from .cli_args import (
    at_least,
    block_size,
    bounded_float,
    cosine,
    engine_args,
    generation_overrides,
    int8_projections_arg,
    kv_cache_arg,
    non_negative_float,
    output_args,
    output_overrides,
    positive_float,
    prefill_int8_arg,
    ray_arg,
    sampling_args,
    threads_arg,
    video_args,
    video_part,
)
from .errors import UserError

if TYPE_CHECKING:
    from .export.options import ExportOptions


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one ``error: ...`` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one worth showing (not None, not a flag's)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def _parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: what they bring (onnx, numpy, Pillow) takes a second or two, and a
    # Ctrl-C then must end in main's one line, not in a traceback from an import.
    from .bench.turns import PAUSE_S
    from .export.quant import DEFAULT_BLOCK_SIZE
    from .shapes.model import PACKAGED_SHAPES

    p = _Parser(prog="qwen3vl-onnx", description="Export Qwen3-VL checkpoints to ONNX bundles and run them on ONNX Runtime.",
                formatter_class=_Help)  # fmt: skip
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, formatter_class=_Help)

    e = add("export", help="export a checkpoint to a bundle", description="Export a checkpoint to a self-contained bundle.")
    e.add_argument("checkpoint", help=f"checkpoint directory (Hugging Face layout), a hub id such as Qwen/Qwen3-VL-2B-Instruct, "
                                      f"or '{PACKAGED_SHAPES}' for the packaged demo model (a folder of that name: "
                                      f"./{PACKAGED_SHAPES})")  # fmt: skip
    e.add_argument("out", help="bundle directory to write (written whole or not at all)")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"], help="decoder weights")
    e.add_argument(
        "--block-size", type=block_size, default=DEFAULT_BLOCK_SIZE, help="int4/int8 quantization block (power of two, 16-256)"
    )
    e.add_argument("--vision-precision", default="auto", choices=["auto", "fp32", "int8"],
                   help="vision tower linear layers (auto: int8 for int4/int8 bundles, else fp32)")  # fmt: skip
    int8_projections_arg(e)
    prefill_int8_arg(e)
    kv_cache_arg(e, export=True)
    e.add_argument("--portable", action="store_true", help="standard ONNX ops only (no ONNX Runtime contrib ops)")
    e.add_argument("--force", action="store_true", help="replace OUT if it is a bundle (or an empty folder), nothing else")

    g = add("generate", help="answer a prompt (with images and videos) from a bundle",
            description="Answer one prompt from a bundle.")  # fmt: skip
    g.add_argument("bundle", help="bundle directory written by export")
    g.add_argument("--prompt", required=True,
                   help="the user's text; '-' reads it from standard input (one trailing newline dropped)")  # fmt: skip
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="image file (repeatable, placed before the text)")
    g.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="video file (repeatable, placed after the images, before the text)")  # fmt: skip
    video_args(g)
    g.add_argument("--system", default=None, help="optional system message")
    sampling_args(g)
    output_args(g)
    g.add_argument("--boxes", default=None, metavar="OUT.png",
                   help="draw the answer's boxes and points (grounding) onto the picture they refer to")  # fmt: skip
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, timings) instead of the stream")
    g.add_argument("--logprobs", type=at_least(0, 20, "OpenAI's limit"), default=None, metavar="N",
                   help="with --json: each token's log-probability and the N likeliest alternatives")  # fmt: skip
    threads_arg(g)
    kv_cache_arg(g)
    g.add_argument("--no-prefill-graph", dest="prefill_graph", action="store_false",
                   help="leave a --prefill-int8 bundle's prompt graph unloaded (less memory, slower prompts)")  # fmt: skip

    c = add("chat", help="talk with a bundle in the terminal (keeps its KV cache between turns)",
            description="An interactive chat: type messages, /help for commands; or pipe messages on stdin.")  # fmt: skip
    c.add_argument("bundle", help="bundle directory written by export")
    c.add_argument("--system", default=None, help="optional system message")
    video_args(c)
    sampling_args(c)
    output_args(c)
    threads_arg(c)
    kv_cache_arg(c)
    c.add_argument("--no-prefill-graph", dest="prefill_graph", action="store_false",
                   help="leave a --prefill-int8 bundle's prompt graph unloaded (less memory, slower prompts)")  # fmt: skip

    s = add("serve", help="an OpenAI-compatible HTTP server over a bundle (needs the server extra)",
            description="Serve a bundle over HTTP: /v1/chat/completions (streaming), /v1/models, /tokenize, /detokenize, "
                        "/health, /metrics. Loopback only unless --host says otherwise.")  # fmt: skip
    s.add_argument("bundle", help="bundle directory written by export")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=at_least(1, 65535, "the largest TCP port"), default=8000, help="port to listen on")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    s.add_argument("--api-key-file", default=None, metavar="FILE", help="the API key, read from a file")
    s.add_argument("--shutdown-grace", type=bounded_float(0, 3600), default=10.0, metavar="S",
                   help="on SIGTERM or Ctrl-C, seconds running answers get to finish before they end with an error")  # fmt: skip
    s.add_argument("--cors-origin", default=None, metavar="ORIGIN", help="allow browser requests from ORIGIN")
    s.add_argument("--metrics", action="store_true", help="Prometheus figures at /metrics")
    s.add_argument("--no-ui", action="store_true", help="no chat page at / (the API only)")
    s.add_argument("--ray-replicas", type=at_least(1, 10_000), default=None, metavar="N",
                   help="serve through Ray Serve: N replicas, each its own engine (needs the ray extra)")  # fmt: skip
    ray_arg(s, "with --ray-replicas: ")
    engine_args(s)

    bt = add("batch", help="answer an OpenAI batch file (JSONL) through the server's engine; resumable",
             description="Answer every line of an OpenAI batch file (or every picture/video of a folder) through the "
                         "server's engine, appending OpenAI batch output lines to OUTPUT; run again to finish an "
                         "interrupted job (needs the server extra).")  # fmt: skip
    bt.add_argument("bundle", help="bundle directory written by export")
    bt.add_argument("files", nargs="+", metavar="INPUT OUTPUT",
                    help="the OpenAI batch input (JSONL) and the output (JSONL, appended to: what it holds is not asked "
                         "again); OUTPUT alone with --images/--videos")  # fmt: skip
    folder = bt.add_mutually_exclusive_group()
    folder.add_argument("--images", default=None, metavar="DIR", help="instead of INPUT: one request per image in DIR")
    folder.add_argument("--videos", default=None, metavar="DIR", help="instead of INPUT: one request per video in DIR")
    bt.add_argument("--prompt", default="Describe this image.", help="with --images/--videos: the question asked of each")
    bt.add_argument("--max-tokens", type=at_least(1), default=None, help="with --images/--videos: answer length limit")
    bt.add_argument("--temperature", type=non_negative_float, default=None, help="with --images/--videos: 0 = greedy")
    ray_arg(bt, "run the job on Ray Data: ")
    bt.add_argument("--ray-actors", type=at_least(1, 10_000), default=None, metavar="N",
                    help="with --ray: engines (Ray actors), each --parallel slots (default: one per node)")  # fmt: skip
    bt.set_defaults(api_key=None, api_key_file=None, shutdown_grace=10.0, cors_origin=None, metrics=False, no_ui=True)
    engine_args(bt)

    v = add("verify", help="compare a bundle with transformers (needs torch)",
            description="Compare a bundle's logits with transformers' on the same inputs (needs the torch extra).")  # fmt: skip
    v.add_argument("checkpoint", help=f"the checkpoint the bundle was exported from (directory, hub id or '{PACKAGED_SHAPES}')")
    v.add_argument("bundle", help="bundle directory")
    v.add_argument("--image", action="append", default=[], metavar="PATH", help="image file (repeatable)")
    v.add_argument("--prompt", default="Describe this image.", help="the user's text")
    v.add_argument("--steps", type=at_least(1, 1024), default=8, help="greedy decode steps compared after the prompt")
    v.add_argument("--tolerance", type=positive_float, default=None,
                   help="float bundles: max |logit difference| (default fp32 1e-3, fp16 5e-2)")  # fmt: skip
    v.add_argument("--min-cosine", type=cosine, default=None,
                   help="pass on mean logit cosine instead (default for int8 0.999, int4 0.99)")  # fmt: skip

    d = add("demo", help="export the packaged shapes model and ask it about fresh pictures",
            description="Export the packaged shapes model (once, cached) and ask it about freshly drawn pictures.")  # fmt: skip
    d.add_argument("--workdir", default=str(Path.home() / ".cache" / "qwen3vl-onnx" / "demo"), help="where the bundle is cached")
    d.add_argument("--rebuild", action="store_true", help="export the bundle again")
    d.add_argument("--seed", type=at_least(0), default=None, help="picture/question seed (default: random)")
    d.add_argument("--questions", type=at_least(1, 100), default=4, help="how many pictures to ask about")
    d.add_argument("--random", action="store_true", help="use a random-weight model instead of the trained one")
    d.add_argument("--prompt", default="What shapes are in this picture?", help="question for --random")
    d.add_argument("--max-new-tokens", type=at_least(1, 4096), default=24, help="answer length for --random")

    b = add("bench", help="speed figures on random weights of a released shape (or a bundle)",
            description="Speed figures on random weights of a released shape, or of a given bundle.")  # fmt: skip
    from .bench.presets import SHAPES  # the preset names only: no measuring code is imported here

    b.add_argument("--shape", default="4b", choices=SHAPES, help="released model shape")
    b.add_argument("--layers", type=at_least(1, 200), default=None, metavar="N",
                   help="only N decoder layers at the shape's real widths; figures also scaled to its depth")  # fmt: skip
    b.add_argument("--repeat-layers", action="store_true",
                   help="with --layers: also measure the shape's full depth, the missing layers reading the N layers' "
                        "weights again (with --compare: llama.cpp's GGUF deepened the same way, in turns)")  # fmt: skip
    b.add_argument("--bundle", default=None, help="measure this bundle instead of a random preset")
    b.add_argument("--precision", default="int4", choices=["fp32", "fp16", "int8", "int4"], help="decoder weights")
    b.add_argument("--block-size", type=block_size, default=DEFAULT_BLOCK_SIZE, help="int4/int8 quantization block")
    b.add_argument("--vision-precision", default="auto", choices=["auto", "fp32", "int8"], help="vision tower linear layers")
    int8_projections_arg(b)
    prefill_int8_arg(b)
    kv_cache_arg(b, export=True)
    b.add_argument("--repeats", type=at_least(1, 100), default=3, help="timed runs per figure (the median is reported)")
    b.add_argument("--compare", action="store_true", help="also run the peers on the same weights")
    b.add_argument("--video", action="store_true",
                   help="instead, video figures: a 10 s clip's preprocess, vision and first token, a 60 s clip's memory "
                        "(with --compare: first token against OpenVINO GenAI on the same frames)")  # fmt: skip
    b.add_argument("--serve", action="store_true",
                   help="instead, server figures: decode with 1/4/8 clients, token gaps during an image prefill, "
                        "a follow-up question cached and fresh (with --compare: decode with 1 and 4 streams against "
                        "OpenVINO GenAI's continuous batching, in turns)")  # fmt: skip
    b.add_argument("--constrained", action="store_true",
                   help="instead, what constrained decoding costs: grammar compile time, mask per token against "
                        "decoder steps of 1 and 4 rows")  # fmt: skip
    b.add_argument("--soak", type=bounded_float(0, 86_400, positive=True, why="a day"), default=None, metavar="S",
                   help="instead, 8 clients against the server for S seconds: errors and memory growth")  # fmt: skip
    b.add_argument("--batch", type=at_least(1, 10_000), default=None, metavar="N",
                   help="instead, N picture requests through the batch command against a loop of generate calls")  # fmt: skip
    b.add_argument("--parallel", type=at_least(1, 256), default=4, help="with --batch: the engine's slots")
    b.add_argument("--ray-actors", type=at_least(1, 64), default=None, metavar="N",
                   help="with --batch: also run the job on N actors of a local Ray cluster (needs the ray extra)")  # fmt: skip
    b.add_argument("--kernels", action="store_true",
                   help="instead, measure this CPU's matmul kernels in GOPS (fp32/int8 peaks, the bundles' kernels)")  # fmt: skip
    b.add_argument("--profile", action="store_true",
                   help="instead, where a decoder step's time goes: each projection kind, attention and the rest, "
                        "with the bytes each reads and its read rate (1 and 4 rows at 100 and 2000 cached)")  # fmt: skip
    b.add_argument("--peers", nargs="+", metavar="NAME", help="with --compare: only peers whose name contains one of these")
    b.add_argument("--turn-pause", type=bounded_float(0, 600), default=PAUSE_S, metavar="S",
                   help="with --compare: seconds each system idles before its call when measured in turns")  # fmt: skip
    b.add_argument("--workdir", default=str(Path.home() / ".cache" / "qwen3vl-onnx" / "bench"),
                   help="random checkpoints and bundles (kept for reuse)")  # fmt: skip
    b.add_argument("--out", default="bench-results", help="directory for the JSON, markdown and chart")

    ev = add("eval", help="accuracy on the held-out shapes questions, per type",
             description="Score a bundle of the shapes model on its held-out questions.")  # fmt: skip
    ev.add_argument("bundle", help="bundle of the shapes model")
    ev.add_argument("-n", type=at_least(1, 10_000), default=200, help="number of held-out items")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    kv_cache_arg(ev)
    return p


def _generate(args: argparse.Namespace) -> int:
    from .cli_chat import write_stream
    from .runtime.generate import stats_line
    from .runtime.pipeline import Pipeline
    from .runtime.sampling import GenerationParams

    if args.boxes and not args.image:
        raise UserError("--boxes needs a picture (--image) to draw on")
    overrides = {**generation_overrides(args), **output_overrides(args)}
    GenerationParams(**overrides).checked(1 << 30)  # before loading anything; token ids are checked later
    prompt = args.prompt
    if prompt == "-":  # one trailing newline dropped, as a shell's $(...) does: echo's and printf's text ask the same
        prompt = sys.stdin.read()
        prompt = prompt[:-2] if prompt.endswith("\r\n") else prompt.removesuffix("\n")
    pipe = Pipeline.from_bundle(args.bundle, threads=args.threads, prefill_graph=args.prefill_graph, kv_cache=args.kv_cache)
    content = [{"type": "image", "image": p} for p in args.image] + [video_part(p, args) for p in args.video]
    content.append({"type": "text", "text": prompt})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": content}]
    stream = pipe.stream(messages, **overrides)
    if args.json:
        stream.finish()
    else:
        write_stream(stream, args.hide_reasoning, sys.stdout)
    res = stream.result
    assert res is not None
    if args.json:
        print(json.dumps(res.to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        for call in res.tool_calls or []:  # one JSON object a line, OpenAI's shape
            print(json.dumps(call.to_dict(), ensure_ascii=False))
        print(stats_line(res), file=sys.stderr)
    if args.boxes:
        from PIL import Image

        from .runtime.grounding import save_marked

        paths, marks = save_marked(res.text, [Image.open(p) for p in args.image], Path(args.boxes))
        print(f"boxes: {len(marks)} marks drawn to {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


def _export_options(args: argparse.Namespace) -> ExportOptions:
    from .export.options import ExportOptions

    return ExportOptions(precision=args.precision, block_size=args.block_size, vision_precision=args.vision_precision,
                         int8_projections=args.int8_projections, prefill_int8=args.prefill_int8,
                         portable=getattr(args, "portable", False), kv_cache=args.kv_cache)  # fmt: skip


def _eval(args: argparse.Namespace) -> int:
    from .runtime.pipeline import Pipeline
    from .shapes.evaluate import evaluate

    rep = evaluate(Pipeline.from_bundle(args.bundle, kv_cache=args.kv_cache), args.n)
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: whatever runs cleans up (an export removes its partial bundle)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``batch``'s file names may also come after its options (argparse takes
    positionals split by options only as far as the first group, so the rest are gathered here)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "batch" and not any(e.startswith("-") for e in extra):
        args.files += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    before = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        args = _parse(argv)
        if args.command == "batch":
            from .server.command import run_batch_command

            return run_batch_command(args)
        if args.command == "serve":
            from .server.command import run_serve

            if before is not None:  # serve stops on SIGTERM by itself, with a grace for running answers
                signal.signal(signal.SIGTERM, before)
                before = None
            return run_serve(args)
        return _run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("error: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _run(args: argparse.Namespace) -> int:
    if args.command == "export":
        from .calibration import Calibrator
        from .export.bundle import export

        print(f"wrote {export(args.checkpoint, args.out, _export_options(args), args.force, Calibrator())}")
        return 0
    if args.command == "bench":
        from .bench.command import run_bench

        return run_bench(args, _export_options(args))
    if args.command == "demo":
        from .demo.command import run_demo

        return run_demo(args)
    if args.command == "chat":
        from .cli_chat import run_chat

        return run_chat(args)
    commands = {"generate": _generate, "verify": _verify, "eval": _eval}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
