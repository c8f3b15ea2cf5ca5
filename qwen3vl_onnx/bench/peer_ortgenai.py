"""onnxruntime-genai peer: its model builder's INT4 CPU export (text decoder only) and its generator.

The builder is run as a new user would (``-p int4 -e cpu``), in a child process so that its time
and peak memory are its own; the export is cached in WORKDIR with the figures measured when it was
made. Prefill is ``Generator.append_tokens`` of random ids, decode is ``generate_next_token``.

    python -m qwen3vl_onnx.bench.peer_ortgenai CKPT WORKDIR REPEATS DECODE_TOKENS
    python -m qwen3vl_onnx.bench.peer_ortgenai --serve CKPT WORKDIR      (a worker for bench/turns.py)
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .procstats import peak_rss_gb, stats
from .run import dir_size, run_measured


def export(ckpt: Path, out: Path) -> dict:
    """Run the builder once; its figures are kept in ``export.json`` beside the model."""
    if (out / "export.json").is_file():
        return json.loads((out / "export.json").read_text())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(tmp), "-p", "int4", "-e", "cpu",
           "-c", str(tmp / "cache")]  # fmt: skip
    fig = run_measured(cmd, "onnxruntime-genai builder")
    shutil.rmtree(tmp / "cache", ignore_errors=True)
    (tmp / "export.json").write_text(json.dumps(fig))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return fig


class _Runner:
    """One loaded model: prefill seconds of given ids, greedy decode rate after a 16-token prompt."""

    def __init__(self, out: Path, decode_tokens: int, seed: int):
        import onnxruntime_genai as og

        self.og, self.model, self.decode_tokens = og, og.Model(str(out)), decode_tokens
        self.rng = np.random.default_rng(seed)

    def _generator(self, n_ids: int):
        p = self.og.GeneratorParams(self.model)
        p.set_search_options(max_length=n_ids + self.decode_tokens + 8, do_sample=False)
        return self.og.Generator(self.model, p)

    def prefill_s(self, ids: np.ndarray) -> float:
        g = self._generator(len(ids))
        t = time.perf_counter()
        g.append_tokens(ids)
        return time.perf_counter() - t

    def decode_tok_s(self) -> float:
        g = self._generator(16)
        g.append_tokens(self.rng.integers(0, 150000, 16).astype(np.int32))
        g.generate_next_token()
        t, n = time.perf_counter(), 0
        while n < self.decode_tokens and not g.is_done():  # random weights rarely pick EOS; count what ran
            g.generate_next_token()
            n += 1
        return n / (time.perf_counter() - t)


def measure(ckpt: Path, work: Path, repeats: int, decode_tokens: int) -> dict:
    out = work / "ortgenai-int4"
    fig = export(ckpt, out)  # the conversion's own figures, named apart from our export's
    res: dict = {"convert_s": fig["export_s"], "convert_peak_rss_gb": fig["export_peak_rss_gb"]}
    res["bundle_gb"] = dir_size(out) / 2**30
    t = time.perf_counter()
    run = _Runner(out, decode_tokens, 0)
    res["load_s"] = time.perf_counter() - t
    for n in (32, 256):
        ids = run.rng.integers(0, 150000, n).astype(np.int32)
        secs = [run.prefill_s(ids) for _ in range(repeats + 1)][1:]  # first is warm-up
        res[f"prefill_{n}_tok_s"] = stats([n / s for s in secs])
    res["decode_tok_s"] = stats([run.decode_tok_s() for _ in range(max(1, repeats - 1))])
    res["decode_tokens"] = decode_tokens
    res["peak_rss_gb"] = peak_rss_gb()
    return res


def serve(ckpt: Path, work: Path) -> None:
    """Worker for ``bench/turns.py`` on the export ``measure`` made: prefill-256 and decode."""
    from .procstats import serve_loop
    from .run import DECODE_TOKENS

    run = _Runner(work / "ortgenai-int4", DECODE_TOKENS, 1)
    serve_loop({
        "prefill_256_tok_s": lambda: 256 / run.prefill_s(run.rng.integers(0, 150000, 256).astype(np.int32)),
        "decode_tok_s": run.decode_tok_s,
    })  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        from .peers import child_main

        child_main(measure, sys.argv[1:])
