"""Vision encode at 448x448, ours and PyTorch bf16 taking turns in one process (``bench --compare``).

Why: the other figures come from one process per system, minutes apart, and this VM's speed drifts
by tens of percent between minutes (the same bundle's 448x448 encode read 1.08 s and 1.38 s on two
runs); a ratio of two medians taken at different times carries that drift. Here each repeat runs
transformers' vision tower, then ours, on the same image, so both see the same machine; the ratio
of each pair is reported with its spread. Only the towers are loaded (PyTorch's in bf16 from the
checkpoint's ``model.visual.*`` tensors, ours from the bundle's vision graph), not the decoders.

python -m qwen3vl_onnx.bench.paired_vision CKPT BUNDLE REPEATS
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .procstats import stats

PREFIX = "model.visual."
# Idle time before each timed call, so that neither runtime's worker threads, which spin for a
# while after a call (OpenMP's block time, ONNX Runtime's spin-then-wait), can overlap the other's
# call on a 2-core machine. A precaution: with and without it the ratios stayed within this VM's noise.
PAUSE_S = 1.0


def _torch_tower(ckpt: Path):
    """transformers' vision tower in bf16 with the checkpoint's weights, every tensor checked."""
    import torch
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from ..export.weights import Checkpoint

    cfg = Qwen3VLConfig.from_pretrained(str(ckpt)).vision_config
    tower = Qwen3VLVisionModel._from_config(cfg, dtype=torch.bfloat16).eval()
    weights = Checkpoint(ckpt)
    state = {k[len(PREFIX) :]: torch.from_numpy(np.asarray(weights[k], np.float32)) for k in weights if k.startswith(PREFIX)}
    tower.load_state_dict(state, strict=True)  # a missing or misnamed tensor fails here (values cast to bf16)
    return tower


def measure(ckpt: Path, bundle: Path, repeats: int) -> dict:
    import torch

    from ..config import Qwen3VLConfig
    from ..runtime.model import encode_images, load_session
    from ..runtime.preprocess import ImageProcessorConfig, preprocess_image

    torch.set_grad_enabled(False)
    tower = _torch_tower(ckpt)
    cfg = Qwen3VLConfig.from_manifest(json.loads((bundle / "manifest.json").read_text())["config"])
    session = load_session(bundle / "vision.onnx")
    pcfg = ImageProcessorConfig.from_file(ckpt / "preprocessor_config.json")
    pv, grid = preprocess_image(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8), pcfg)
    pv_t, grid_t = torch.from_numpy(pv).to(torch.bfloat16), torch.tensor([grid])

    def timed(fn) -> float:
        time.sleep(PAUSE_S)
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def run_torch():
        return tower(pv_t, grid_thw=grid_t)

    def run_ours():
        return encode_images(session, cfg.vision, pv, [grid])

    theirs_out, ours_out = run_torch().pooler_output.float().numpy(), run_ours()[0]  # also the warm-up
    a, b = theirs_out.ravel().astype(np.float64), ours_out.ravel().astype(np.float64)
    theirs, ours = [], []
    for _ in range(repeats):
        theirs.append(timed(run_torch))
        ours.append(timed(run_ours))
    return {
        "tokens": len(ours_out),
        # same weights, same image: the two towers' embeddings agree (bf16 against int8 rounding)
        "embeds_cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
        "ours_s": stats(ours),
        "torch_bf16_s": stats(theirs),
        "pair_ratios": stats([t / o for t, o in zip(theirs, ours, strict=True)]),
    }


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))
