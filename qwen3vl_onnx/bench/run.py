"""``qwen3vl-onnx bench``: the figures a CPU user of a VLM cares about, each a median of repeats.

Measured on one bundle: export time and peak RSS (in a child process), bundle size, load time,
vision encode at 448x448 and 896x896, prefill tok/s at 32 and 256 tokens, time to first token for
a 448x448 image plus a short question, decode tok/s over 128 tokens, and the inference process's
peak RSS. ``--compare`` adds peers run on the same random weights (see ``peers.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..demo.checkpoint import write_checkpoint
from ..errors import UserError
from ..export.options import ExportOptions
from .presets import preset_config
from .procstats import failure_reason, peak_rss_gb, run_polled, stats


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare_checkpoint(shape: str, directory: Path, layers: int | None = None) -> Path:
    """The random checkpoint of a preset (``layers``: depth-reduced), written once into ``directory``."""
    ckpt = directory / "checkpoint"
    if not (ckpt / "model.safetensors").is_file():
        print(f"writing random {shape} checkpoint to {ckpt}", file=sys.stderr)
        write_checkpoint(ckpt, preset_config(shape, layers))
    return ckpt


def run_measured(cmd: list[str], what: str) -> dict:
    """Run ``cmd`` in a child process: its wall time and its own peak RSS (``procstats.run_polled``)."""
    t = time.perf_counter()
    code, out, err, peak = run_polled(cmd)
    secs = time.perf_counter() - t
    if code:
        raise RuntimeError(f"{what} failed (exit {code}): {failure_reason(err if err.strip() else out)}")
    return {"export_s": secs, "export_peak_rss_gb": peak}


def export_measured(ckpt: Path, bundle: Path, options: ExportOptions) -> dict:
    """Export in a child process so its time and peak memory are its own. ``options`` as the user
    asked: what "auto" leaves to the export (the default KV cache) is decided there, as for them."""
    cmd = [sys.executable, "-m", "qwen3vl_onnx.cli", "export", str(ckpt), str(bundle), *options.argv(), "--force"]
    return run_measured(cmd, "export")


def prefill_once(m, ids: list[int]) -> None:
    """A prompt-only prefill into a fresh cache: the call prefill tok/s times (here and in bench turns)."""
    m.prefill(ids, None, None, (), m.new_cache(capacity=len(ids)))


def image_question(img: np.ndarray) -> list[dict]:
    """The first-token prompt: one picture and a short question (here and in bench turns)."""
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is in this picture?"}]}]


DECODE_TOKENS = 128  # tokens generated per decode-speed sample (after the first, the prefill's)
FIRST_ANSWER_TOKENS = 32  # the first turn's answer length in the conversation figures


def decode_rate(pipe) -> float:
    """Greedy decode tok/s of DECODE_TOKENS after a short chat prompt (here and in bench turns)."""
    story = [{"role": "user", "content": "Tell me a story."}]
    return pipe.generate(story, max_new_tokens=DECODE_TOKENS, temperature=0, ignore_eos=True).timings["decode_tok_per_s"]


def second_turn(pipe, rng: np.random.Generator, repeats: int) -> dict:
    """First token of a follow-up question in a conversation about a 448x448 picture: kept in a
    ``Conversation`` (only the question is prefilled) and recomputed from the whole history (what a
    stateless call does). Each repeat is a new conversation about a new picture."""
    kept, full = [], []
    for _ in range(repeats + 1):
        conv = pipe.chat()
        conv.send(image_question(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))[0]["content"],
                  max_new_tokens=FIRST_ANSWER_TOKENS, temperature=0, ignore_eos=True).finish()  # fmt: skip
        history = [*conv.messages, {"role": "user", "content": "And what else is there?"}]
        kept.append(conv.send("And what else is there?", max_new_tokens=1, temperature=0).finish().timings["ttft_s"])
        full.append(pipe.generate(history, max_new_tokens=1, temperature=0).timings["ttft_s"])
    return {"second_turn_ttft_s": stats(kept[1:]), "second_turn_recomputed_ttft_s": stats(full[1:])}  # first: warm-up


def measure_bundle(bundle: Path, repeats: int, threads: int | None = None) -> dict:
    """Inference figures for one bundle (run in a fresh process to get its own peak RSS)."""
    from ..runtime.pipeline import Pipeline

    size, vision = dir_size(bundle), sum(f.stat().st_size for f in bundle.glob("vision*") if f.is_file())
    # the text part is what a text-only peer (onnxruntime-genai) stores: the bundle without its vision tower
    res: dict = {"bundle_gb": size / 2**30, "text_gb": (size - vision) / 2**30}
    t = time.perf_counter()
    pipe = Pipeline.from_bundle(bundle, threads=threads)
    res["load_s"] = time.perf_counter() - t
    m = pipe.model
    rng = np.random.default_rng(0)
    for side in (448, 896):
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        p = pipe.prepare([{"role": "user", "content": [{"type": "image", "image": img}]}])
        res[f"vision_{side}_s"] = stats(timed(lambda p=p: m.encode_images(p.pixel_values, p.grids), repeats))
        res[f"vision_{side}_tokens"] = len(p.pixel_values) // 4
    for n in (32, 256):
        ids = rng.integers(0, 150000, n).tolist()
        secs = timed(lambda ids=ids: prefill_once(m, ids), repeats)
        res[f"prefill_{n}_tok_s"] = stats([n / s for s in secs])
    img = rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)
    q = image_question(img)
    res["ttft_448_s"] = stats(timed(lambda: pipe.generate(q, max_new_tokens=1, temperature=0), repeats))
    res.update(second_turn(pipe, rng, repeats))
    res["decode_tok_s"] = stats([decode_rate(pipe) for _ in range(max(1, repeats - 1))])
    res["decode_tokens"] = DECODE_TOKENS
    res["peak_rss_gb"] = peak_rss_gb()
    return res


# The instruction-set extensions that decide which ONNX Runtime kernels run (AMX is listed where a
# CPU advertises it; the project never relies on it, as it traps on some of its machines).
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")


def machine() -> dict:
    """CPU model, core count, the CPU_FLAGS it has, and the runtime versions: every figure is read against these."""
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": [f for f in CPU_FLAGS if f in flags],
            "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}  # fmt: skip


def child_measure(bundle: Path, repeats: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "qwen3vl_onnx.bench.run", str(bundle), str(repeats)], capture_output=True, text=True
    )
    if r.returncode:
        said = r.stderr.strip().splitlines()
        if r.returncode == 2 and said and said[-1].startswith("error: "):  # a problem with the bundle, said in one line
            raise UserError(f"{bundle}: {said[-1][len('error: ') :]}")
        raise RuntimeError(f"bench child failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # child entry: python -m qwen3vl_onnx.bench.run BUNDLE REPEATS
    try:
        print(json.dumps(measure_bundle(Path(sys.argv[1]), int(sys.argv[2]))))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
