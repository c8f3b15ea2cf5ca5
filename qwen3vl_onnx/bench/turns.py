"""Two systems measured in turns: vision encode, prefill-256, first token with a 448x448 image (``bench --compare``).

Why: each peer otherwise runs in its own process minutes after ours, and this VM's speed moves
20-50% within minutes, more than the gaps being judged (ours against OpenVINO GenAI is within
15%). Here both systems stay loaded in their own worker processes (each under its own Python,
OpenVINO's from its virtual environment) and the driver asks them in turn, one call at a time
with a pause before each, so every pair of figures comes from the same minute.

Protocol, one line each way: the worker prints ``ready`` once loaded; then for each task name it
reads it answers one JSON line ``{"value": ...}`` (tok/s for prefill and for greedy decode of
DECODE_TOKENS after a short prompt, seconds for the vision encode of a preprocessed 448x448
picture and for the first token).
Prompt and first-token calls get fresh input each time (new random prompt, new picture), since
OpenVINO's pipeline reuses a repeated prefix's KV cache and caches image embeddings; the vision
task encodes one preprocessed picture, which neither ours nor transformers' tower caches.

    python -m qwen3vl_onnx.bench.turns BUNDLE       (our worker)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .procstats import failure_reason, serve_loop, stats

# task -> higher value is better (prefill in tok/s) or not (vision encode and first token in seconds)
TASKS = {"vision_448_s": False, "prefill_256_tok_s": True, "ttft_448_s": False, "ttft_video_s": False, "decode_tok_s": True,
         "decode_1_streams_tok_s": True, "decode_4_streams_tok_s": True}  # fmt: skip
PAUSE_S = 1.0  # idle before each call, so one system's spinning threads never overlap the other's call


class Worker:
    """A worker process answering tasks over stdin/stdout."""

    def __init__(self, name: str, cmd: list[str]):
        self.name = name
        # stderr to a file, not a pipe: a chatty worker (progress bars, warnings) would fill a pipe
        # nobody reads until it fails, and block
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self._expect("ready")

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {failure_reason(self.err.read())}")
        return line.strip()

    def _expect(self, word: str) -> None:
        while self._line() != word:
            pass  # libraries may print to stdout while loading

    def ask(self, task: str) -> float:
        self.proc.stdin.write(task + "\n")
        self.proc.stdin.flush()
        while not (line := self._line()).startswith("{"):
            pass
        return float(json.loads(line)["value"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.err.close()


def take_turns(ours_cmd: list[str], theirs_cmd: list[str], tasks: list[str], repeats: int, pause_s: float = PAUSE_S,
               after: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Per task (names from TASKS): both systems' figures and the ratio of each pair (> 1: ours faster).
    ``after``: facts asked once of each worker at the end (such as the prompt tokens a task used).

    Workers start one after the other, so the second loads while the first is idle.
    """
    ours = Worker("ours", ours_cmd)
    try:
        theirs = Worker("peer", theirs_cmd)
    except Exception:
        ours.close()
        raise
    res: dict = {}
    try:
        for task in tasks:
            higher = TASKS[task]
            for w in (ours, theirs):  # warm-up call each
                w.ask(task)
            a, b = [], []
            for _ in range(repeats):
                for w, out in ((ours, a), (theirs, b)):
                    time.sleep(pause_s)
                    out.append(w.ask(task))
            ratios = [x / y if higher else y / x for x, y in zip(a, b, strict=True)]
            res[task] = {"ours": stats(a), "peer": stats(b), "pair_ratios": stats(ratios)}
        for fact in after:
            res[fact] = {"ours": ours.ask(fact), "peer": theirs.ask(fact)}
    finally:
        ours.close()
        theirs.close()
    return res


def our_worker_command(bundle: Path, frames: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "qwen3vl_onnx.bench.turns", str(bundle), *([str(frames)] if frames else [])]


def serve(bundle: Path, frames_path: Path | None = None) -> None:
    """Our side: answers TASKS for a bundle until stdin closes (``ttft_video_s`` with ``frames_path``:
    the .npy of video frames, its .json beside it giving their fps)."""
    from ..runtime.pipeline import Pipeline
    from ..runtime.preprocess import preprocess_image
    from .run import decode_rate, image_question, prefill_once

    pipe = Pipeline.from_bundle(bundle)
    m = pipe.model
    rng = np.random.default_rng(1)

    def prefill_256_tok_s() -> float:
        ids = rng.integers(0, 150000, 256).tolist()
        t = time.perf_counter()
        prefill_once(m, ids)
        return 256 / (time.perf_counter() - t)

    pv, grid = preprocess_image(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8), pipe.image_config)

    def vision_448_s() -> float:
        t = time.perf_counter()
        m.encode_images(pv, [grid])
        return time.perf_counter() - t

    def ttft_448_s() -> float:
        q = image_question(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))
        t = time.perf_counter()
        pipe.generate(q, max_new_tokens=1, temperature=0)
        return time.perf_counter() - t

    answer = {"vision_448_s": vision_448_s, "prefill_256_tok_s": prefill_256_tok_s, "ttft_448_s": ttft_448_s,
              "decode_tok_s": lambda: decode_rate(pipe)}  # fmt: skip
    if frames_path is not None:
        from .video import video_question

        frames = np.load(frames_path)
        fps = json.loads(frames_path.with_suffix(".json").read_text())["fps"]
        calls = iter(range(1 << 30))

        def ttft_video_s() -> float:
            f = frames.copy()
            f[0, 0, 0, 0] = next(calls) % 256  # new content each call, as the peer caches what it has seen
            q = video_question(list(f), fps)
            t = time.perf_counter()
            pipe.generate(q, max_new_tokens=1, temperature=0)
            return time.perf_counter() - t

        answer["ttft_video_s"] = ttft_video_s
        answer["video_input_tokens"] = lambda: float(len(pipe.prepare(video_question(list(frames), fps)).ids))
    serve_loop(answer)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
