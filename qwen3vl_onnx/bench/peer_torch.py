"""PyTorch transformers peer (fp32 or bf16) for ``bench --compare``: the reference a user starts from.

python -m qwen3vl_onnx.bench.peer_torch CKPT WORKDIR REPEATS DECODE_TOKENS DTYPE
python -m qwen3vl_onnx.bench.peer_torch --serve CKPT WORKDIR DTYPE      (a worker for bench/turns.py)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .procstats import peak_rss_gb, stats


def _load(ckpt: Path, dtype_name: str):
    """The checkpoint as a transformers model in ``dtype_name`` (fp32 or bf16), for inference."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.set_grad_enabled(False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    return Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=dtype).eval()


def _picture(ckpt: Path, rng: np.random.Generator, model):
    """A random 448x448 picture through our processor (same pixels as transformers'), as the vision
    tower's (pixel_values, grid_thw) in the model's dtype."""
    import torch

    from ..runtime.preprocess import ImageProcessorConfig, preprocess_image

    pcfg = ImageProcessorConfig.from_file(ckpt / "preprocessor_config.json")
    pv, grid = preprocess_image(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8), pcfg)
    return torch.from_numpy(pv).to(model.dtype), torch.tensor([grid])


def _vision_s(model, pv_t, grid_t) -> float:
    """Seconds for one vision-tower encode (here and in the turns worker)."""
    t = time.perf_counter()
    model.model.visual(pv_t, grid_thw=grid_t)
    return time.perf_counter() - t


def _prefill_s(model, ids) -> float:
    """Seconds for one prompt-only forward over ``ids``, logits for the last position only."""
    t = time.perf_counter()
    model(input_ids=ids, logits_to_keep=1)
    return time.perf_counter() - t


def measure(ckpt: Path, work: Path, repeats: int, decode_tokens: int, dtype_name: str) -> dict:
    import torch

    t = time.perf_counter()
    model = _load(ckpt, dtype_name)
    res: dict = {"load_s": time.perf_counter() - t}
    rng = np.random.default_rng(0)
    pv_t, g_t = _picture(ckpt, rng, model)
    model.model.visual(pv_t, grid_thw=g_t)
    res["vision_448_s"] = stats([_vision_s(model, pv_t, g_t) for _ in range(repeats)])
    ids = torch.tensor([rng.integers(0, 150000, 256).tolist()])
    model(input_ids=ids[:, :32])
    res["prefill_256_tok_s"] = stats([256 / _prefill_s(model, ids) for _ in range(repeats)])
    model.generate(input_ids=ids[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    t = time.perf_counter()
    model.generate(input_ids=ids[:, :16], max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1, do_sample=False)
    total = time.perf_counter() - t
    first = 16 / res["prefill_256_tok_s"]["median"]  # a 16-token prefill, from the measured prefill rate
    res["decode_tok_s"] = stats([decode_tokens / max(total - first, 1e-9)])
    res["decode_tokens"] = decode_tokens
    res["peak_rss_gb"] = peak_rss_gb()
    return res


def serve(ckpt: Path, dtype_name: str) -> None:
    """Worker for ``bench/turns.py``: answers vision and prefill-256 calls (no first-token figure here)."""
    import torch

    from .procstats import serve_loop

    model = _load(ckpt, dtype_name)
    rng = np.random.default_rng(1)
    pv_t, grid_t = _picture(ckpt, rng, model)
    serve_loop({
        "vision_448_s": lambda: _vision_s(model, pv_t, grid_t),
        "prefill_256_tok_s": lambda: 256 / _prefill_s(model, torch.tensor([rng.integers(0, 150000, 256).tolist()])),
    })  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "--serve":  # python -m qwen3vl_onnx.bench.peer_torch --serve CKPT WORKDIR DTYPE
        serve(Path(sys.argv[2]), sys.argv[4])
    else:
        from .peers import child_main

        child_main(measure, sys.argv[1:])
