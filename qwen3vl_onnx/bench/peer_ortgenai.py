"""onnxruntime-genai peer: its model builder's INT4 CPU export (text decoder only) and its generator.

The builder is run as a new user would (``-p int4 -e cpu``), in a child process so that its time
and peak memory are its own; the export is cached in WORKDIR with the figures measured when it was
made. Prefill is ``Generator.append_tokens`` of random ids, decode is ``generate_next_token``.

    python -m qwen3vl_onnx.bench.peer_ortgenai CKPT WORKDIR REPEATS DECODE_TOKENS
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


def measure(ckpt: Path, work: Path, repeats: int, decode_tokens: int) -> dict:
    import onnxruntime_genai as og

    out = work / "ortgenai-int4"
    fig = export(ckpt, out)  # the conversion's own figures, named apart from our export's
    res: dict = {"convert_s": fig["export_s"], "convert_peak_rss_gb": fig["export_peak_rss_gb"]}
    res["bundle_gb"] = dir_size(out) / 2**30
    t = time.perf_counter()
    model = og.Model(str(out))
    res["load_s"] = time.perf_counter() - t
    rng = np.random.default_rng(0)

    def generator(n_ids: int):
        p = og.GeneratorParams(model)
        p.set_search_options(max_length=n_ids + decode_tokens + 8, do_sample=False)
        return og.Generator(model, p)

    for n in (32, 256):
        ids = rng.integers(0, 150000, n).astype(np.int32)
        secs = []
        for i in range(repeats + 1):  # first is warm-up
            g = generator(n)
            t = time.perf_counter()
            g.append_tokens(ids)
            if i:
                secs.append(time.perf_counter() - t)
            del g
        res[f"prefill_{n}_tok_s"] = stats([n / s for s in secs])
    rates = []
    for _ in range(max(1, repeats - 1)):
        g = generator(16)
        g.append_tokens(rng.integers(0, 150000, 16).astype(np.int32))
        g.generate_next_token()
        t, n = time.perf_counter(), 0
        while n < decode_tokens and not g.is_done():  # random weights rarely pick EOS; count what ran
            g.generate_next_token()
            n += 1
        rates.append(n / (time.perf_counter() - t))
        del g
    res["decode_tok_s"] = stats(rates)
    res["decode_tokens"] = decode_tokens
    res["peak_rss_gb"] = peak_rss_gb()
    return res


if __name__ == "__main__":
    from .peers import child_main

    child_main(measure, sys.argv[1:])
