"""llama.cpp peer through llama-cpp-python: Q4_0 / Q4_K_M text model plus the f16 vision projector.

The HF->GGUF converter comes from llama-cpp-python's own source distribution (fetched with pip at
bench time into WORKDIR, or a llama.cpp tree named by ``QWEN3VL_ONNX_LLAMA_CPP``); nothing of
llama.cpp lives in this repository. Conversion and quantization are cached in WORKDIR with the
figures measured when they were made. Prefill is ``Llama.eval`` of random ids (n_batch 512),
decode is one ``eval`` per token; vision is ``mtmd_encode_chunk`` of a 448x448 picture.
Build llama-cpp-python without native CPU detection and with AMX off (AMX traps in these VMs):
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"``.

    python -m qwen3vl_onnx.bench.peer_llamacpp CKPT WORKDIR REPEATS DECODE_TOKENS QTYPE
    python -m qwen3vl_onnx.bench.peer_llamacpp --serve CKPT WORKDIR QTYPE      (a worker for bench/turns.py)
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from .procstats import peak_rss_gb, stats
from .run import run_measured

FTYPES = {"Q4_0": 2, "Q4_K_M": 15}  # llama_ftype values
CONTEXT = 4096  # never the 262k training context: it would not fit in memory


def converter_root(work: Path) -> Path:
    """A llama.cpp tree holding convert_hf_to_gguf.py, from llama-cpp-python's sdist of the installed version."""
    if os.environ.get("QWEN3VL_ONNX_LLAMA_CPP"):
        return Path(os.environ["QWEN3VL_ONNX_LLAMA_CPP"])
    import llama_cpp

    ver = llama_cpp.__version__
    root = work / f"llama-cpp-python-{ver}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    sdist_dir = work / "sdist"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"llama-cpp-python=={ver}",
        "--no-binary",
        ":all:",
        "--no-deps",
        "-d",
        str(sdist_dir),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    (sdist,) = sdist_dir.glob(f"llama_cpp_python-{ver}.tar.gz")
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        keep = [m for m in tar.getmembers() if m.name.startswith(prefix) and
                (m.name.endswith("convert_hf_to_gguf.py") or "/conversion/" in m.name or "/gguf-py/" in m.name)]  # fmt: skip
        tar.extractall(work, members=keep, filter="data")
    (work / f"llama_cpp_python-{ver}").rename(root.parent.parent)
    return root


def convert(ckpt: Path, work: Path) -> tuple[Path, Path, dict]:
    """f16 text GGUF and f16 mmproj GGUF, each converted once."""
    text, mmproj, fig_file = work / "llama-f16.gguf", work / "llama-mmproj-f16.gguf", work / "llama-convert.json"
    if fig_file.is_file():
        return text, mmproj, json.loads(fig_file.read_text())
    script = str(converter_root(work) / "convert_hf_to_gguf.py")
    fig = run_measured([sys.executable, script, str(ckpt), "--outfile", f"{text}.partial", "--outtype", "f16"], "GGUF convert")
    run_measured(
        [sys.executable, script, str(ckpt), "--mmproj", "--outfile", f"{mmproj}.partial", "--outtype", "f16"], "mmproj convert"
    )
    os.replace(f"{text}.partial", text)
    os.replace(f"{mmproj}.partial", mmproj)
    fig_file.write_text(json.dumps(fig))
    return text, mmproj, fig


def quantize(f16: Path, qtype: str) -> tuple[Path, float]:
    import llama_cpp

    out = f16.with_name(f"llama-{qtype}.gguf")
    if out.is_file():
        return out, 0.0
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = os.cpu_count() or 1
    t = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(f16).encode(), f"{out}.partial".encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama.cpp quantize to {qtype} failed")
    os.replace(f"{out}.partial", out)
    return out, time.perf_counter() - t


def vision_seconds(llm, mmproj: Path, repeats: int) -> tuple[list[float], int]:
    """Encode time of one 448x448 picture through libmtmd (llama.cpp's own preprocessing)."""
    from llama_cpp import mtmd_cpp as mt

    p = mt.mtmd_context_params_default()
    p.use_gpu, p.n_threads, p.print_timings = False, os.cpu_count() or 1, False
    ctx = mt.mtmd_init_from_file(str(mmproj).encode(), llm.model, p)
    if not ctx:
        raise RuntimeError("mtmd_init_from_file failed")
    rgb = np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    bitmap = mt.mtmd_bitmap_init(448, 448, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    prompt = mt.mtmd_default_marker() + b" What is in this picture?"
    text = mt.mtmd_input_text(prompt, len(prompt), True, True)
    chunks = mt.mtmd_input_chunks_init()
    if mt.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mt.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
        raise RuntimeError("mtmd_tokenize failed")
    parts = [mt.mtmd_input_chunks_get(chunks, i) for i in range(mt.mtmd_input_chunks_size(chunks))]
    image = next(c for c in parts if mt.mtmd_input_chunk_get_type(c) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE)
    secs = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        if mt.mtmd_encode_chunk(ctx, image):
            raise RuntimeError("mtmd_encode_chunk failed")
        if i:
            secs.append(time.perf_counter() - t)
    tokens = mt.mtmd_input_chunk_get_n_tokens(image)
    mt.mtmd_input_chunks_free(chunks)
    mt.mtmd_bitmap_free(bitmap)
    mt.mtmd_free(ctx)
    return secs, tokens


def fresh(llm) -> None:
    """Empty context: ``Llama.reset`` only rewinds its token count, the KV cache must be cleared too."""
    llm.reset()
    llm._ctx.kv_cache_clear()


def load(model_file: Path):
    from llama_cpp import Llama

    return Llama(str(model_file), n_ctx=CONTEXT, n_batch=512, n_threads=os.cpu_count(), verbose=False)


def prefill_s(llm, ids: list[int]) -> float:
    fresh(llm)
    t = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - t


def decode_tok_s(llm, rng: np.random.Generator, tokens: int) -> float:
    """Greedy decode rate after a 16-token random prompt, one ``eval`` per token."""
    fresh(llm)
    llm.eval(rng.integers(0, 150000, 16).tolist())
    t = time.perf_counter()
    for _ in range(tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return tokens / (time.perf_counter() - t)


def measure(ckpt: Path, work: Path, repeats: int, decode_tokens: int, qtype: str) -> dict:
    f16, mmproj, fig = convert(ckpt, work)
    model_file, qsecs = quantize(f16, qtype)
    res: dict = {"convert_s": fig["export_s"] + qsecs, "convert_peak_rss_gb": fig["export_peak_rss_gb"]}
    res["bundle_gb"] = (model_file.stat().st_size + mmproj.stat().st_size) / 2**30
    t = time.perf_counter()
    llm = load(model_file)
    res["load_s"] = time.perf_counter() - t
    rng = np.random.default_rng(0)
    for n in (32, 256):
        ids = rng.integers(0, 150000, n).tolist()
        secs = [prefill_s(llm, ids) for _ in range(repeats + 1)][1:]  # first is warm-up
        res[f"prefill_{n}_tok_s"] = stats([n / s for s in secs])
    res["decode_tok_s"] = stats([decode_tok_s(llm, rng, decode_tokens) for _ in range(max(1, repeats - 1))])
    res["decode_tokens"] = decode_tokens
    try:
        secs, tokens = vision_seconds(llm, mmproj, repeats)
        res["vision_448_s"], res["vision_448_tokens"] = stats(secs), tokens
    except Exception as e:  # noqa: BLE001 - reported, not hidden: the text figures still stand
        res["vision_error"] = f"{type(e).__name__}: {e}"
    res["peak_rss_gb"] = peak_rss_gb()
    return res


def serve(ckpt: Path, work: Path, qtype: str) -> None:
    """Worker for ``bench/turns.py`` on the GGUF ``measure`` made: prefill-256 and decode."""
    from .procstats import serve_loop
    from .run import DECODE_TOKENS

    f16, _, _ = convert(ckpt, work)
    llm = load(quantize(f16, qtype)[0])
    rng = np.random.default_rng(1)
    serve_loop({
        "prefill_256_tok_s": lambda: 256 / prefill_s(llm, rng.integers(0, 150000, 256).tolist()),
        "decode_tok_s": lambda: decode_tok_s(llm, rng, DECODE_TOKENS),
    })  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    else:
        from .peers import child_main

        child_main(measure, sys.argv[1:])
