"""Peers for ``bench --compare``, each run on the same random checkpoint in its own process.

Every peer is a module ``peer_<name>.py`` with ``measure(ckpt, workdir, repeats, decode_tokens,
*extra) -> dict`` whose keys match ours (``prefill_256_tok_s``, ``decode_tok_s``, ...); it runs
in a child process so its load, peak RSS and failures stay its own. A peer whose package is absent
is reported as skipped with how to install it, never estimated.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .procstats import failure_reason

LLAMA_BUILD = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" pip install llama-cpp-python'
)
OPENVINO_VENV = (
    "python -m venv V && V/bin/pip install torch==2.13.0 transformers==5.0.0 'optimum-intel[openvino]==2.2.0' openvino-genai "
    "&& V/bin/pip uninstall -y torchvision  (V: $QWEN3VL_ONNX_OPENVINO_VENV or WORKDIR/openvino-venv; torchvision's "
    "CUDA build does not import beside the CPU torch and the export does not need it)"
)


class Peer(NamedTuple):
    module: str  # peer_<name> module; "openvino" runs peer_openvino.py under its own venv's interpreter
    args: list[str]  # extra arguments of its measure()
    needs: list[str]  # python modules it imports
    install: str  # how to install them
    bytes_per_weight: int  # for its bundle size when it has no files of its own (0: measured from disk)


FROM_CLONE = "pip install -e '.[torch]' in the project's clone"
PEERS: dict[str, Peer] = {
    "PyTorch bf16": Peer("peer_torch", ["bf16"], ["torch", "transformers"], FROM_CLONE, 2),
    "PyTorch fp32": Peer("peer_torch", ["fp32"], ["torch", "transformers"], FROM_CLONE, 4),
    "onnxruntime-genai int4 (text)": Peer("peer_ortgenai", [], ["onnxruntime_genai", "onnx_ir", "torch", "transformers"],
                                          "pip install onnxruntime-genai -e '.[torch]' in the project's clone", 0),
    "llama.cpp Q4_0": Peer("peer_llamacpp", ["Q4_0"], ["llama_cpp", "torch", "sentencepiece"], LLAMA_BUILD, 0),
    "llama.cpp Q4_K_M": Peer("peer_llamacpp", ["Q4_K_M"], ["llama_cpp", "torch", "sentencepiece"], LLAMA_BUILD, 0),
    "OpenVINO GenAI int4 (bf16 default)": Peer("openvino", ["default"], [], OPENVINO_VENV, 0),
    "OpenVINO GenAI int4 (f32 hint)": Peer("openvino", ["f32"], [], OPENVINO_VENV, 0),
}  # fmt: skip


def openvino_python(workdir: Path) -> Path:
    venv = Path(os.environ.get("QWEN3VL_ONNX_OPENVINO_VENV", workdir.parent.parent / "openvino-venv"))
    return venv / "bin" / "python"


def command(module: str, workdir: Path) -> list[str]:
    if module == "openvino":
        return [str(openvino_python(workdir)), str(Path(__file__).with_name("peer_openvino.py"))]
    return [sys.executable, "-m", f"qwen3vl_onnx.bench.{module}"]


def missing(modules: list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def run_peers(ckpt: Path, params: int, repeats: int, workdir: Path, only: list[str] | None = None,
              decode_tokens: int = 128) -> dict:  # fmt: skip
    """Run each peer (or those named in ``only``) and return name -> figures or {"skipped": why}."""
    peers: dict = {}
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name, peer in PEERS.items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        weights = params * peer.bytes_per_weight
        if absent := missing(peer.needs):
            peers[name] = {"skipped": f"{', '.join(absent)} not installed ({peer.install})"}
        elif peer.module == "openvino" and not openvino_python(workdir).is_file():
            peers[name] = {"skipped": f"no OpenVINO environment at {openvino_python(workdir).parent.parent} ({peer.install})"}
        elif weights > 0.6 * mem:  # leave room for activations and the OS
            peers[name] = {"skipped": f"needs {weights / 2**30:.1f} GiB of weights, machine has {mem / 2**30:.0f} GiB"}
        else:
            print(f"measuring {name}", file=sys.stderr)
            cmd = [*command(peer.module, workdir), str(ckpt), str(workdir), str(repeats), str(decode_tokens), *peer.args]
            r = subprocess.run(cmd, capture_output=True, text=True)
            lines = r.stdout.strip().splitlines()
            if r.returncode == 0 and lines:
                peers[name] = json.loads(lines[-1])
            else:
                peers[name] = {"skipped": f"failed (exit {r.returncode}): {failure_reason(r.stderr)}"}
        print(f"{name}: {peers[name].get('skipped', 'done')}", file=sys.stderr)
    return peers


def child_main(measure: Callable[..., dict], argv: list[str]) -> None:
    """Entry of a peer's child process: CKPT WORKDIR REPEATS DECODE_TOKENS [extra...] -> one JSON line."""
    ckpt, work, repeats, decode = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(measure(ckpt, work, repeats, decode, *argv[4:])))


# Pairs for the measurements in turns: each ratio is one pair, so a few more than --repeats' 3.
TURN_MIN_PAIRS = 5


class TurnPeer(NamedTuple):
    args: list[str]  # its worker command's extra arguments
    tasks: list[str]  # the figures it answers in turns


# peer -> how ``bench/turns.py`` asks it
TURN_PEERS = {
    "PyTorch bf16": TurnPeer(["bf16"], ["vision_448_s", "prefill_256_tok_s"]),
    "onnxruntime-genai int4 (text)": TurnPeer([], ["prefill_256_tok_s", "decode_tok_s"]),
    "llama.cpp Q4_0": TurnPeer(["Q4_0"], ["prefill_256_tok_s", "decode_tok_s"]),
    "OpenVINO GenAI int4 (bf16 default)": TurnPeer(["default"], ["prefill_256_tok_s", "ttft_448_s"]),
    "OpenVINO GenAI int4 (f32 hint)": TurnPeer(["f32"], ["prefill_256_tok_s", "ttft_448_s"]),
}


def run_turns(ckpt: Path, bundle: Path, peers: dict, workdir: Path, repeats: int, pause_s: float) -> dict:
    """The tasks of each peer in TURN_PEERS that ran, ours and theirs taken in turns (see turns.py)."""
    from .turns import our_worker_command, take_turns

    out: dict = {}
    for name, (extra, tasks) in TURN_PEERS.items():
        if name not in peers or "skipped" in peers[name]:
            continue
        module = PEERS[name].module
        cmd = [*command(module, workdir), "--serve", str(ckpt), str(workdir), *extra]
        print(f"measuring in turns with {name}", file=sys.stderr)
        try:
            out[name] = take_turns(our_worker_command(bundle), cmd, tasks, repeats, pause_s)
        except RuntimeError as e:
            out[name] = {"skipped": f"failed: {e}"}
    return out


def _openvino_turns(workdir: Path, only: list[str] | None, what: str, ours: list[str], worker_args: Callable[[Peer], list[str]],
                    tasks: list[str], repeats: int, pause_s: float, after: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """``tasks`` asked of our worker (command ``ours``) and of each OpenVINO GenAI precision's worker
    (``peer_openvino.py`` with ``worker_args(peer)``) in turns; a peer without its environment, or
    whose worker fails, is reported as skipped with the reason."""
    from .turns import take_turns

    out: dict = {}
    for name, peer in PEERS.items():
        if peer.module != "openvino" or (only and not any(o.lower() in name.lower() for o in only)):
            continue
        if not openvino_python(workdir).is_file():
            out[name] = {"skipped": f"no OpenVINO environment at {openvino_python(workdir).parent.parent} ({peer.install})"}
            continue
        print(f"measuring {what} in turns with {name}", file=sys.stderr)
        try:
            out[name] = take_turns(ours, [*command("openvino", workdir), *worker_args(peer)], tasks, repeats, pause_s, after)
        except RuntimeError as e:
            out[name] = {"skipped": f"failed: {e}"}
    return out


def run_video_turns(ckpt: Path, bundle: Path, workdir: Path, frames: Path, repeats: int, pause_s: float,
                    only: list[str] | None = None) -> dict:  # fmt: skip
    """First token for the same video frames, ours and each OpenVINO GenAI precision in turns (its
    worker exports the checkpoint first when no export is cached)."""
    from .turns import our_worker_command

    return _openvino_turns(workdir, only, "the video", our_worker_command(bundle, frames),
                           lambda peer: ["--serve", str(ckpt), str(workdir), *peer.args, str(frames)],
                           ["ttft_video_s"], repeats, pause_s, after=("video_input_tokens",))  # fmt: skip


SERVE_TOKENS = 64  # tokens per stream in the decode rates of ``bench --serve``


def run_serve_turns(ckpt: Path, bundle: Path, workdir: Path, repeats: int, pause_s: float, only: list[str] | None = None,
                    tokens: int = SERVE_TOKENS) -> dict:  # fmt: skip
    """Decode rates of 1 and 4 streams: our server (``--parallel 4``, streaming HTTP clients) and each
    OpenVINO GenAI precision's continuous-batching pipeline (in process, no HTTP), in turns."""
    return _openvino_turns(workdir, only, "decode with 1 and 4 streams",
                           [sys.executable, "-m", "qwen3vl_onnx.bench.serve", str(bundle), str(tokens)],
                           lambda peer: ["--serve-batched", str(ckpt), str(workdir), *peer.args, str(tokens)],
                           ["decode_1_streams_tok_s", "decode_4_streams_tok_s"], repeats, pause_s)  # fmt: skip
