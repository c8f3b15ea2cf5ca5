"""``qwen3vl-onnx``: export, generate, verify and demo.

Every user-fixable problem surfaces as one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from . import __version__
from .bench.turns import PAUSE_S
from .errors import UserError
from .export.options import ExportOptions
from .export.quant import DEFAULT_BLOCK_SIZE
from .shapes.model import PACKAGED_SHAPES


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


def _at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive_float(text: str) -> float:
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _cosine(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a cosine is at most 1, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qwen3vl-onnx", description="Export Qwen3-VL checkpoints to ONNX bundles and run them on ONNX Runtime.",
                formatter_class=_Help)  # fmt: skip
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, formatter_class=_Help)

    e = add("export", help="export a checkpoint to a bundle", description="Export a checkpoint to a self-contained bundle.")
    e.add_argument("checkpoint", help=f"checkpoint directory (Hugging Face layout), a hub id such as Qwen/Qwen3-VL-2B-Instruct, "
                                      f"or '{PACKAGED_SHAPES}' for the packaged demo model")  # fmt: skip
    e.add_argument("out", help="bundle directory to write (written whole or not at all)")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"], help="decoder weights")
    e.add_argument(
        "--block-size", type=_block_size, default=DEFAULT_BLOCK_SIZE, help="int4/int8 quantization block (power of two >= 16)"
    )
    e.add_argument("--vision-precision", default="auto", choices=["auto", "fp32", "int8"],
                   help="vision tower linear layers (auto: int8 for int4/int8 bundles, else fp32)")  # fmt: skip
    _int8_projections_arg(e)
    _prefill_int8_arg(e)
    e.add_argument("--portable", action="store_true", help="standard ONNX ops only (no ONNX Runtime contrib ops)")
    e.add_argument("--force", action="store_true", help="replace OUT if it exists")

    g = add("generate", help="answer a prompt (with images and videos) from a bundle",
            description="Answer one prompt from a bundle.")  # fmt: skip
    g.add_argument("bundle", help="bundle directory written by export")
    g.add_argument("--prompt", required=True, help="the user's text; '-' reads it from standard input")
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="image file (repeatable, placed before the text)")
    g.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="video file (repeatable, placed after the images, before the text)")  # fmt: skip
    _video_args(g)
    g.add_argument("--system", default=None, help="optional system message")
    _sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, timings) instead of the stream")
    g.add_argument("--logprobs", type=_at_least(0), default=None, metavar="N",
                   help="with --json: each token's log-probability and the N likeliest alternatives")  # fmt: skip
    _threads_arg(g)
    g.add_argument("--no-prefill-graph", dest="prefill_graph", action="store_false",
                   help="leave a --prefill-int8 bundle's prompt graph unloaded (less memory, slower prompts)")  # fmt: skip

    c = add("chat", help="talk with a bundle in the terminal (keeps its KV cache between turns)",
            description="An interactive chat: type messages, /help for commands; or pipe messages on stdin.")  # fmt: skip
    c.add_argument("bundle", help="bundle directory written by export")
    c.add_argument("--system", default=None, help="optional system message")
    _video_args(c)
    _sampling_args(c)
    _threads_arg(c)
    c.add_argument("--no-prefill-graph", dest="prefill_graph", action="store_false",
                   help="leave a --prefill-int8 bundle's prompt graph unloaded (less memory, slower prompts)")  # fmt: skip

    s = add("serve", help="an OpenAI-compatible HTTP server over a bundle (needs the server extra)",
            description="Serve a bundle over HTTP: /v1/chat/completions (streaming), /v1/models, /tokenize, /detokenize, "
                        "/health, /metrics. Loopback only unless --host says otherwise.")  # fmt: skip
    s.add_argument("bundle", help="bundle directory written by export")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=_at_least(1), default=8000, help="port to listen on")
    s.add_argument("--model-name", default=None, help="the model id clients name (default: the bundle's folder name)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    s.add_argument("--api-key-file", default=None, metavar="FILE", help="the API key, read from a file")
    s.add_argument("--parallel", type=_at_least(1), default=4, help="requests decoded together (slots)")
    s.add_argument("--ctx-size", type=_at_least(16), default=4096, help="tokens per slot, prompt and answer")
    s.add_argument("--queue-size", type=_at_least(1), default=64, help="requests waiting for a slot before 429")
    s.add_argument("--prefill-slice-ms", type=_at_least(1), default=250,
                   help="longest prompt call while other requests stream (their next token waits for it)")  # fmt: skip
    s.add_argument("--shutdown-grace", type=_non_negative_float, default=10.0, metavar="S",
                   help="on SIGTERM or Ctrl-C, seconds running answers get to finish before they end with an error")  # fmt: skip
    s.add_argument("--allowed-media-dir", default=None, metavar="DIR", help="serve file:// image/video URLs from inside DIR")
    s.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image/video URLs")
    s.add_argument("--cors-origin", default=None, metavar="ORIGIN", help="allow browser requests from ORIGIN")
    s.add_argument("--max-images", type=_at_least(0), default=8, help="images and videos per request")
    s.add_argument("--max-video-frames", type=_at_least(1), default=64, help="frames sampled per video at most")
    s.add_argument("--max-image-pixels", type=_at_least(1), default=40_000_000, help="pixels per image file at most")
    s.add_argument("--max-body-mb", type=_positive_float, default=20.0, help="request body limit in MB")
    s.add_argument("--metrics", action="store_true", help="Prometheus figures at /metrics")
    _threads_arg(s)

    v = add("verify", help="compare a bundle with transformers (needs torch)",
            description="Compare a bundle's logits with transformers' on the same inputs (needs the torch extra).")  # fmt: skip
    v.add_argument("checkpoint", help=f"the checkpoint the bundle was exported from (directory, hub id or '{PACKAGED_SHAPES}')")
    v.add_argument("bundle", help="bundle directory")
    v.add_argument("--image", action="append", default=[], metavar="PATH", help="image file (repeatable)")
    v.add_argument("--prompt", default="Describe this image.", help="the user's text")
    v.add_argument("--steps", type=_at_least(1), default=8, help="greedy decode steps compared after the prompt")
    v.add_argument("--tolerance", type=_positive_float, default=None,
                   help="float bundles: max |logit difference| (default fp32 1e-3, fp16 5e-2)")  # fmt: skip
    v.add_argument("--min-cosine", type=_cosine, default=None,
                   help="pass on mean logit cosine instead (default for int8 0.999, int4 0.99)")  # fmt: skip

    d = add("demo", help="export the packaged shapes model and ask it about fresh pictures",
            description="Export the packaged shapes model (once, cached) and ask it about freshly drawn pictures.")  # fmt: skip
    d.add_argument("--workdir", default=str(Path.home() / ".cache" / "qwen3vl-onnx" / "demo"), help="where the bundle is cached")
    d.add_argument("--rebuild", action="store_true", help="export the bundle again")
    d.add_argument("--seed", type=_at_least(0), default=None, help="picture/question seed (default: random)")
    d.add_argument("--questions", type=_at_least(1), default=4, help="how many pictures to ask about")
    d.add_argument("--random", action="store_true", help="use a random-weight model instead of the trained one")
    d.add_argument("--prompt", default="What shapes are in this picture?", help="question for --random")
    d.add_argument("--max-new-tokens", type=_at_least(1), default=24, help="answer length for --random")

    b = add("bench", help="speed figures on random weights of a released shape (or a bundle)",
            description="Speed figures on random weights of a released shape, or of a given bundle.")  # fmt: skip
    b.add_argument("--shape", default="4b", choices=["tiny", "2b", "4b", "8b", "32b"], help="released model shape")
    b.add_argument("--bundle", default=None, help="measure this bundle instead of a random preset")
    b.add_argument("--precision", default="int4", choices=["fp32", "fp16", "int8", "int4"], help="decoder weights")
    b.add_argument("--block-size", type=_block_size, default=DEFAULT_BLOCK_SIZE, help="int4/int8 quantization block")
    b.add_argument("--vision-precision", default="auto", choices=["auto", "fp32", "int8"], help="vision tower linear layers")
    _int8_projections_arg(b)
    _prefill_int8_arg(b)
    b.add_argument("--repeats", type=_at_least(1), default=3, help="timed runs per figure (the median is reported)")
    b.add_argument("--compare", action="store_true", help="also run the peers on the same weights")
    b.add_argument("--video", action="store_true",
                   help="instead, video figures: a 10 s clip's preprocess, vision and first token, a 60 s clip's memory "
                        "(with --compare: first token against OpenVINO GenAI on the same frames)")  # fmt: skip
    b.add_argument("--serve", action="store_true",
                   help="instead, server figures: decode with 1/4/8 clients, token gaps during an image prefill, "
                        "a follow-up question cached and fresh (with --compare: decode with 1 and 4 streams against "
                        "OpenVINO GenAI's continuous batching, in turns)")  # fmt: skip
    b.add_argument("--soak", type=_positive_float, default=None, metavar="S",
                   help="instead, 8 clients against the server for S seconds: errors and memory growth")  # fmt: skip
    b.add_argument("--kernels", action="store_true",
                   help="instead, measure this CPU's matmul kernels in GOPS (fp32/int8 peaks, the bundles' kernels)")  # fmt: skip
    b.add_argument("--peers", nargs="+", metavar="NAME", help="with --compare: only peers whose name contains one of these")
    b.add_argument("--turn-pause", type=_non_negative_float, default=PAUSE_S, metavar="S",
                   help="with --compare: seconds each system idles before its call when measured in turns")  # fmt: skip
    b.add_argument("--workdir", default=str(Path.home() / ".cache" / "qwen3vl-onnx" / "bench"),
                   help="random checkpoints and bundles (kept for reuse)")  # fmt: skip
    b.add_argument("--out", default="bench-results", help="directory for the JSON, markdown and chart")

    ev = add("eval", help="accuracy on the held-out shapes questions, per type",
             description="Score a bundle of the shapes model on its held-out questions.")  # fmt: skip
    ev.add_argument("bundle", help="bundle of the shapes model")
    ev.add_argument("-n", type=_at_least(1), default=200, help="number of held-out items")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _block_size(text: str) -> int:
    value = _at_least(16)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_at_least(1), default=None, help="ONNX Runtime intra-op threads (default: one per core)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the bundle's generation config)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: generation config)")
    p.add_argument(
        "--top-k", type=int, default=None, help="sample among the k likeliest tokens, 0 = all (default: generation config)"
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output (default: random)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this times the likeliest")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating prompt and answer tokens")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted from tokens already generated, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per repetition of a token, in [-2, 2]")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end the answer before this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-turn token")
    p.add_argument("--hide-reasoning", action="store_true", help="Thinking checkpoints: print only the answer, not the reasoning")


def _video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video-fps", type=_positive_float, default=None, metavar="FPS",
                   help="frames sampled per second of video (default: the checkpoint's, 2)")  # fmt: skip
    p.add_argument("--video-max-frames", type=_at_least(1), default=None, metavar="N",
                   help="at most N frames per video (default: the checkpoint's limit)")  # fmt: skip
    p.add_argument("--video-start", type=_non_negative_float, default=None, metavar="SECONDS",
                   help="use the videos from this time on")  # fmt: skip
    p.add_argument("--video-end", type=_non_negative_float, default=None, metavar="SECONDS",
                   help="use the videos up to this time")  # fmt: skip


def video_part(path: str, args: argparse.Namespace) -> dict:
    """A message part for the video at ``path`` with the --video-* options."""
    part: dict = {"type": "video", "video": path}
    if args.video_fps is not None:
        part["fps"] = args.video_fps
    if args.video_max_frames is not None:
        part["max_frames"] = args.video_max_frames
    if args.video_start is not None:
        part["video_start"] = args.video_start
    if args.video_end is not None:
        part["video_end"] = args.video_end
    return part


def generation_overrides(args: argparse.Namespace) -> dict:
    """The GenerationParams fields the sampling options set."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, stop=tuple(args.stop), seed=args.seed, ignore_eos=args.ignore_eos,
                logprobs=getattr(args, "logprobs", None))  # fmt: skip


def _generate(args: argparse.Namespace) -> int:
    from .cli_chat import write_stream
    from .runtime.generate import stats_line
    from .runtime.pipeline import Pipeline
    from .runtime.sampling import GenerationParams

    GenerationParams(**generation_overrides(args)).checked(1 << 30)  # before loading anything; token ids are checked later
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    pipe = Pipeline.from_bundle(args.bundle, threads=args.threads, prefill_graph=args.prefill_graph)
    content = [{"type": "image", "image": p} for p in args.image] + [video_part(p, args) for p in args.video]
    content.append({"type": "text", "text": prompt})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": content}]
    stream = pipe.stream(messages, **generation_overrides(args))
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
        print(stats_line(res), file=sys.stderr)
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


def _export_options(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(precision=args.precision, block_size=args.block_size, vision_precision=args.vision_precision,
                         int8_projections=args.int8_projections, prefill_int8=args.prefill_int8,
                         portable=getattr(args, "portable", False))  # fmt: skip


def _eval(args: argparse.Namespace) -> int:
    from .runtime.pipeline import Pipeline
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

            print(f"wrote {export(args.checkpoint, args.out, _export_options(args), args.force)}")
            return 0
        if args.command == "serve":
            from .server.command import run_serve

            return run_serve(args)
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
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
