"""The command line's argument types and shared option groups: every count bounded by what the
machine or the task can use, every bad value one ``error: ...`` line before anything runs.

Shared by ``cli`` (the parser and most commands) and ``cli_chat`` (the chat loop), which both
import from here and not from each other.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

# Frames per video at most, whatever a checkpoint's config says (Qwen3-VL's video processor default).
MAX_VIDEO_FRAMES = 768


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask: a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def at_least(lo: int, hi: int | None = None, why: str = "") -> Callable[[str], int]:
    """An integer option in [lo, hi]; ``why`` says where the upper bound comes from."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}{f' ({why})' if why else ''}, got {value}")
        return value

    return parse


def bounded_float(lo: float, hi: float, positive: bool = False, why: str = "") -> Callable[[str], float]:
    """A finite number in [lo, hi] (``positive``: above ``lo``, not at it)."""

    def parse(text: str) -> float:
        value = number(text)
        if not (lo < value if positive else lo <= value):
            raise argparse.ArgumentTypeError(f"must be a {'positive number' if positive and lo == 0 else f'number >= {lo:g}'}, "
                                             f"got {text}")  # fmt: skip
        if not value <= hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:g}{f' ({why})' if why else ''}, got {text}")
        return value

    return parse


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    value = number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def cosine(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a cosine is at most 1, got {text}")
    return value


# ONNX Runtime's CPU MatMulNBits kernels have fast paths for blocks of 16 to 256; larger blocks
# only pad every row (a 4096 block took 6.2 GB to export a 22 MB model).
MAX_BLOCK_SIZE = 256


def block_size(text: str) -> int:
    value = at_least(16, MAX_BLOCK_SIZE, "the largest block ONNX Runtime's CPU kernels run fast")(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value


def threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=at_least(1, usable_cores(), "the cores this process may use"), default=None,
                   help="ONNX Runtime intra-op threads (default: one per core)")  # fmt: skip


def ray_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", default=None, metavar="ADDRESS|local",
                   help=what + "the Ray cluster at ADDRESS (auto, ray://head:10001, ...) or 'local' for one started "
                        "here (needs the ray extra)")  # fmt: skip


def engine_args(p: argparse.ArgumentParser) -> None:
    """The server engine's options and request rules, shared by ``serve`` and ``batch``."""
    from .runtime.preprocess import MAX_IMAGE_PIXELS

    p.add_argument("--model-name", default=None, help="the model id requests name (default: the bundle's folder name)")
    p.add_argument("--parallel", type=at_least(1, 256), default=4, help="requests decoded together (slots)")
    p.add_argument("--ctx-size", type=at_least(16, 1 << 24), default=None,
                   help="tokens per slot, prompt and answer (default 4096, or the model's context where shorter)")  # fmt: skip
    p.add_argument("--queue-size", type=at_least(1, 100_000), default=64, help="requests waiting for a slot before 429")
    p.add_argument("--prefill-slice-ms", type=at_least(1, 60_000), default=250,
                   help="longest prompt call while other requests stream (their next token waits for it)")  # fmt: skip
    p.add_argument("--allowed-media-dir", default=None, metavar="DIR", help="read file:// image/video URLs from inside DIR")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image/video URLs")
    p.add_argument("--max-images", type=at_least(0, 256), default=8, help="images and videos per request")
    p.add_argument("--max-video-frames", type=at_least(1, MAX_VIDEO_FRAMES, "Qwen3-VL's own limit"), default=64,
                   help="frames sampled per video at most")  # fmt: skip
    p.add_argument("--max-image-pixels", type=at_least(1, MAX_IMAGE_PIXELS, "what the image reader takes"), default=40_000_000,
                   help="pixels per image file at most")  # fmt: skip
    p.add_argument("--max-body-mb", type=bounded_float(0, 4096, positive=True), default=20.0, help="request body limit in MB")
    threads_arg(p)
    kv_cache_arg(p)


def sampling_args(p: argparse.ArgumentParser) -> None:
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


def video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video-fps", type=bounded_float(0, 1000, positive=True), default=None, metavar="FPS",
                   help="frames sampled per second of video (default: the checkpoint's, 2)")  # fmt: skip
    p.add_argument("--video-max-frames", type=at_least(1, MAX_VIDEO_FRAMES, "Qwen3-VL's own limit"), default=None, metavar="N",
                   help="at most N frames per video (default: the checkpoint's limit)")  # fmt: skip
    p.add_argument("--video-start", type=non_negative_float, default=None, metavar="SECONDS",
                   help="use the videos from this time on")  # fmt: skip
    p.add_argument("--video-end", type=non_negative_float, default=None, metavar="SECONDS",
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


def projection_list(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x not in ("", "none"))


def int8_projections_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--int8-projections", default=None, metavar="LIST", type=projection_list,
                   help="int4: decoder projections kept at 8 bits, comma-separated from q_proj, k_proj, v_proj, "
                        "o_proj, gate_proj, up_proj, down_proj, lm_head, or none (default by CPU kind: v_proj,lm_head "
                        "with VNNI, none on AVX2 only)")  # fmt: skip


def kv_cache_arg(p: argparse.ArgumentParser, export: bool = False) -> None:
    if export:
        p.add_argument("--kv-cache", default="auto", choices=["auto", "fp32", "int8"],
                       help="KV cache the bundle runs with unless told otherwise (auto: int4/int8 bundles get an int8 cache, "
                            "the default where its logits agree with the fp32 cache's on calibration prompts; "
                            "else fp32); an int8 bundle keeps the fp32-cache graphs too")  # fmt: skip
    else:
        p.add_argument("--kv-cache", default=None, choices=["fp32", "int8"],
                       help="KV cache precision (default: the bundle's; int8 is about a quarter of the memory)")  # fmt: skip


def prefill_int8_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-int8", action="store_true",
                   help="int4/int8: add a prompt graph with int8 GEMMs (faster prefill; "
                        "+1 byte per decoder weight in memory)")  # fmt: skip


def output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="answer with JSON valid against the schema in FILE (held by a grammar, not asked for)")  # fmt: skip
    p.add_argument("--tools", default=None, metavar="FILE",
                   help="functions the model may call: a JSON list of OpenAI tools; calls are printed as JSON")  # fmt: skip
    p.add_argument("--tool-choice", default=None, metavar="auto|none|required|NAME",
                   help="with --tools: whether (and which function) the model must call (default auto)")  # fmt: skip


def _json_file(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"{path}: the {what} is not JSON ({e})") from None


def output_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The GenerationParams fields --json-schema, --tools and --tool-choice set (files read here)."""
    out: dict[str, Any] = {}
    if args.json_schema:
        schema = _json_file(args.json_schema, "JSON schema")
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": Path(args.json_schema).stem, "schema": schema}}
    if args.tools:
        out["tools"] = _json_file(args.tools, "tools list")
    if args.tool_choice is not None:
        choice = args.tool_choice
        named = {"type": "function", "function": {"name": choice}}
        out["tool_choice"] = choice if choice in ("auto", "none", "required") else named
    return out
