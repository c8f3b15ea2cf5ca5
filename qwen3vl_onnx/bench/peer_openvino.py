"""OpenVINO GenAI peer: optimum-intel INT4 export and ``VLMPipeline``, run from its own virtual env.

optimum-intel 2.2 exports Qwen3-VL only with transformers 5.0.0, so this file runs as a plain
script under that environment's interpreter, where this package is not installed: it imports
numpy, openvino, openvino_genai and, from beside it, the stdlib-only ``procstats.py``. The export
is cached in WORKDIR with the figures measured when it was made. Prefill rate is input tokens
over the pipeline's time to first token of a text-only prompt, first token with a picture is wall
time, decode is 1 / its time per output token. Both the default inference precision (bf16 on a CPU
with AVX512-BF16) and ``INFERENCE_PRECISION_HINT=f32`` are measured.

    OPENVINO_VENV/bin/python peer_openvino.py CKPT WORKDIR REPEATS DECODE_TOKENS [f32|default]
    OPENVINO_VENV/bin/python peer_openvino.py --serve CKPT WORKDIR f32|default [FRAMES.npy]  (a worker for bench/turns.py)
    OPENVINO_VENV/bin/python peer_openvino.py --serve-batched CKPT WORKDIR f32|default TOKENS  (the same, for bench --serve)
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from procstats import failure_reason, peak_rss_gb, run_polled, serve_loop, stats  # beside this file: sys.path[0] of a script


def export(ckpt: Path, out: Path) -> dict:
    if (out / "export.json").is_file():
        return json.loads((out / "export.json").read_text())
    cfg = json.loads((ckpt / "config.json").read_text())
    dims = [cfg["text_config"]["hidden_size"], cfg["text_config"]["intermediate_size"]]
    group = 128 if all(d % 128 == 0 for d in dims) else 32  # optimum's default 128 unless the (tiny) widths forbid it
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cli = str(Path(sys.executable).with_name("optimum-cli"))
    cmd = [cli, "export", "openvino", "-m", str(ckpt), "--task", "image-text-to-text", "--weight-format", "int4",
           "--group-size", str(group), str(tmp)]  # fmt: skip
    t = time.perf_counter()
    code, _, err, peak = run_polled(cmd)
    if code:
        raise RuntimeError(f"optimum-cli export failed (exit {code}): {failure_reason(err)}")
    fig = {"export_s": time.perf_counter() - t, "export_peak_rss_gb": peak}
    (tmp / "export.json").write_text(json.dumps(fig))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return fig


def _pipeline(out: Path, ckpt: Path, precision: str):
    import openvino_genai as og

    props = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}
    pipe = og.VLMPipeline(str(out), "CPU", **props)
    template = ckpt / "chat_template.json"  # the checkpoint's template, where tokenizer_config.json lacks one
    if template.is_file():
        pipe.get_tokenizer().set_chat_template(json.loads(template.read_text())["chat_template"])
    return pipe


def _run(pipe, prompt: str, images: list, new_tokens: int, videos: list | None = None):
    import openvino_genai as og

    cfg = og.GenerationConfig()
    cfg.max_new_tokens, cfg.ignore_eos = new_tokens, True
    if videos:
        return pipe.generate(prompt, images=images, videos=videos, generation_config=cfg).perf_metrics
    return pipe.generate(prompt, images=images, generation_config=cfg).perf_metrics


def _prompt(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def _ttft_448(pipe, rng, i: int) -> float:
    import openvino as ov

    img = ov.Tensor(rng.integers(0, 256, (1, 448, 448, 3), dtype=np.uint8))
    t = time.perf_counter()
    _run(pipe, f"What is in picture {i}?", [img], 1)
    return time.perf_counter() - t


def _prefill_rate(m) -> float:
    return m.get_num_input_tokens() / (m.get_ttft().mean / 1000)


# Every call gets a new prompt and a new picture: the pipeline reuses the KV cache of a repeated
# prefix and caches image embeddings, which would time a cache hit instead of the work.
WORDS = "the of and to in is was for on with as by at from that this are be it or an".split()


def measure(ckpt: Path, work: Path, repeats: int, decode_tokens: int, precision: str = "default") -> dict:
    out = work / "openvino-int4"
    fig = export(ckpt, out)  # the conversion's own figures, named apart from our export's
    res: dict = {"convert_s": fig["export_s"], "convert_peak_rss_gb": fig["export_peak_rss_gb"]}
    res["bundle_gb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**30
    t = time.perf_counter()
    pipe = _pipeline(out, ckpt, precision)
    res["load_s"] = time.perf_counter() - t
    rng = np.random.default_rng(0)
    for n in (32, 256):
        rates = []
        for i in range(repeats + 1):
            m = _run(pipe, _prompt(rng, n), [], 1)
            if i:
                rates.append(_prefill_rate(m))
        res[f"prefill_{n}_tok_s"] = stats(rates)
        res[f"prefill_{n}_input_tokens"] = m.get_num_input_tokens()  # chat template included
    # No vision figure: the pipeline's vision_encoding_duration read 0.07 s at the 4B shape while its
    # first token with the picture took 5.7 s, so it covers only part of the tower (the export splits
    # it into patch-embedding, position and merger models); time to first token stands instead.
    ttft = [_ttft_448(pipe, rng, i) for i in range(repeats + 1)][1:]
    res["ttft_448_s"] = stats(ttft)
    rates = []
    for _ in range(max(1, repeats - 1)):
        m = _run(pipe, f"Tell me story number {rng.integers(1000)}.", [], decode_tokens + 1)
        rates.append(1000 / m.get_tpot().mean)
    res["decode_tok_s"] = stats(rates)
    res["decode_tokens"] = decode_tokens
    res["peak_rss_gb"] = peak_rss_gb()
    return res


def _ttft_video(pipe, frames: np.ndarray, i: int) -> float:
    """First token for a question about ``frames`` (T, H, W, 3 uint8), one pixel changed per call
    so the pipeline's cache of seen pictures never answers."""
    import openvino as ov

    f = frames.copy()
    f[0, 0, 0, 0] = i % 256
    t = time.perf_counter()
    m = _run(pipe, "What happens in this video?", [], 1, [ov.Tensor(f)])
    VIDEO_TOKENS.append(m.get_num_input_tokens())
    return time.perf_counter() - t


VIDEO_TOKENS: list[int] = []  # input tokens of each video call


def serve(ckpt: Path, work: Path, precision: str, frames_path: Path | None = None) -> None:
    """Worker for ``bench/turns.py``: the cached export's pipeline answering prefill and first-token
    calls (and first token for the video frames in ``frames_path``, a .npy)."""
    export(ckpt, work / "openvino-int4")  # cached after the first time
    pipe = _pipeline(work / "openvino-int4", ckpt, precision)
    rng = np.random.default_rng(1)
    calls = itertools.count()
    answer = {
        "prefill_256_tok_s": lambda: _prefill_rate(_run(pipe, _prompt(rng, 256), [], 1)),
        "ttft_448_s": lambda: _ttft_448(pipe, rng, next(calls)),
    }
    if frames_path is not None:
        frames = np.load(frames_path)
        answer["ttft_video_s"] = lambda: _ttft_video(pipe, frames, next(calls))
        answer["video_input_tokens"] = lambda: float(VIDEO_TOKENS[-1])
    serve_loop(answer)


def serve_batched(ckpt: Path, work: Path, precision: str, tokens: int) -> None:
    """Worker for ``bench --serve --compare``: aggregate decode tok/s of 1 and of 4 sequences started
    together on a ``ContinuousBatchingPipeline`` (OpenVINO GenAI's continuous batching with a paged
    KV cache), counted as the server bench counts ours: tokens over the time every sequence streams."""
    import openvino_genai as og

    export(ckpt, work / "openvino-int4")
    sched = og.SchedulerConfig()
    sched.max_num_seqs, sched.cache_size = 8, 2  # sequences, GB of KV cache
    props = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}
    pipe = og.ContinuousBatchingPipeline(str(work / "openvino-int4"), sched, "CPU", {}, props)
    ids = itertools.count()

    def rate(streams: int) -> float:
        cfg = og.GenerationConfig()
        cfg.max_new_tokens = cfg.min_new_tokens = tokens
        cfg.ignore_eos, cfg.apply_chat_template = True, False
        call = next(ids)  # a new prompt each call: no cached prefix answers for the work
        handles = [pipe.add_request(call * 16 + i, f"Tell me a long story about lighthouse keeper {call} ({i}).", cfg)
                   for i in range(streams)]  # fmt: skip
        got, marks = [0] * streams, []
        while pipe.has_non_finished_requests():
            pipe.step()
            for i, h in enumerate(handles):
                if h.can_read():
                    got[i] += sum(len(o.generated_ids) for o in h.read().values())
            marks.append((time.perf_counter(), min(got), sum(got)))
        start = next(m for m in marks if m[1] >= 1)
        end = next(m for m in marks if m[1] >= tokens)  # sequences end together (same length, EOS ignored)
        return (end[2] - start[2]) / (end[0] - start[0])

    serve_loop({"decode_1_streams_tok_s": lambda: rate(1), "decode_4_streams_tok_s": lambda: rate(4)})


if __name__ == "__main__":
    if sys.argv[1] == "--serve-batched":  # peer_openvino.py --serve-batched CKPT WORKDIR PRECISION TOKENS
        Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
        serve_batched(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        sys.exit(0)
    if sys.argv[1] == "--serve":
        Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)  # peer_openvino.py --serve CKPT WORKDIR PRECISION [FRAMES.npy]
        serve(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5]) if len(sys.argv) > 5 else None)
        sys.exit(0)
    work = Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(measure(Path(sys.argv[1]), work, int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])))
