"""Peers for ``bench --compare``, each run on the same random checkpoint in its own process.

Implemented: PyTorch transformers (fp32 and bf16). Peers whose packages are absent are reported as
skipped with the reason, never estimated. onnxruntime-genai, OpenVINO GenAI and llama.cpp runners
are not written yet (see the README's status).
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .run import stats

OTHER_PEERS = {
    "onnxruntime-genai int4 (text only)": "onnxruntime_genai",
    "OpenVINO GenAI int4": "openvino_genai",
    "llama.cpp Q4_0 / Q4_K_M": "llama_cpp",
}


def torch_measure(ckpt: Path, dtype_name: str, repeats: int, decode_tokens: int) -> dict:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from ..runtime.preprocess import ImageProcessorConfig, preprocess_image

    torch.set_grad_enabled(False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=dtype).eval()
    res: dict = {"load_s": time.perf_counter() - t}
    rng = np.random.default_rng(0)
    pcfg = ImageProcessorConfig.from_file(ckpt / "preprocessor_config.json")
    for side in (448,):
        pv, grid = preprocess_image(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), pcfg)
        pv_t, g_t = torch.from_numpy(pv).to(dtype), torch.tensor([grid])
        model.model.visual(pv_t, grid_thw=g_t)
        secs = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.model.visual(pv_t, grid_thw=g_t)
            secs.append(time.perf_counter() - t)
        res[f"vision_{side}_s"] = stats(secs)
    ids = torch.tensor([rng.integers(0, 150000, 256).tolist()])
    model(input_ids=ids[:, :32])
    secs = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        secs.append(time.perf_counter() - t)
    res["prefill_256_tok_s"] = stats([256 / s for s in secs])
    model.generate(input_ids=ids[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    t = time.perf_counter()
    model.generate(input_ids=ids[:, :16], max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1, do_sample=False)
    total = time.perf_counter() - t
    first = 16 / res["prefill_256_tok_s"]["median"]  # a 16-token prefill, from the measured prefill rate
    res["decode_tok_s"] = stats([decode_tokens / max(total - first, 1e-9)])
    res["decode_tokens"] = decode_tokens
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return res


def run_peers(ckpt: Path, params: int, repeats: int, decode_tokens: int = 32) -> dict:
    peers: dict = {}
    have_torch = importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for dt, bytes_per in (("bf16", 2), ("fp32", 4)):
        name = f"PyTorch transformers {dt}"
        if not have_torch:
            peers[name] = {"skipped": "torch/transformers not installed (pip install 'qwen3vl-onnx[torch]')"}
        elif params * bytes_per > 0.6 * mem:  # leave room for activations and the OS
            peers[name] = {"skipped": f"needs {params * bytes_per / 2**30:.1f} GiB of weights, machine has {mem / 2**30:.0f} GiB"}
        else:
            cmd = [sys.executable, "-m", "qwen3vl_onnx.bench.peers", str(ckpt), dt, str(repeats), str(decode_tokens)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            peers[name] = (
                json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"skipped": f"failed: {r.stderr[-300:]}"}
            )
        print(f"{name}: {'done' if 'skipped' not in peers[name] else peers[name]['skipped']}", file=sys.stderr)
    for name, module in OTHER_PEERS.items():
        if importlib.util.find_spec(module) is None:
            peers[name] = {"skipped": f"{module} not installed"}
        else:
            peers[name] = {"skipped": "runner not implemented yet"}
    return peers


if __name__ == "__main__":  # python -m qwen3vl_onnx.bench.peers CKPT DTYPE REPEATS DECODE_TOKENS
    print(json.dumps(torch_measure(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
