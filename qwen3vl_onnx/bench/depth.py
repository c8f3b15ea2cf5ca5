"""Figures of a depth-reduced bench checkpoint (``bench --layers N``) scaled to the released depth.

A random 30B-A3B checkpoint is ~62 GB of bf16, so the bench can keep the real widths and write only
N decoder layers. Every decoder layer of a preset has the same shape, so per-layer costs scale
linearly; what is not a layer (vision tower, token table, lm_head) is counted once where it can be
told apart, and otherwise the scaling errs on the slow side, as stated per figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from ..export import segments


def layer_bytes(bundle: Path) -> int:
    """Bytes layer 0 of the decoder stores in the bundle (every layer of a preset has its shape)."""
    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    layers = json.loads((bundle / "manifest.json").read_text())["config"]["text"]["num_hidden_layers"]
    return segments.layer_bytes(model.graph, layers)[0]


def scaled(ours: dict, bundle: Path, layers: int, full: int) -> dict:
    """The figures ``ours`` (measured with ``layers`` decoder layers) as they would be with ``full``.

    - bundle and peak RSS: plus (full - layers) x one layer's stored bytes (exact for the bundle;
      for RSS it assumes each layer's weights are resident once, as the memory-mapped data are).
    - decode and prefill: per-token time x full / layers, an upper bound on time (lm_head and the
      token lookup are counted full / layers times), so the tok/s given are lower bounds.
    - first token with a picture: the vision encode once, the rest x full / layers.
    """
    f = full / layers
    layer_gb = layer_bytes(bundle) / 1e9
    extra_gb = (full - layers) * layer_gb
    med = {k: v["median"] if isinstance(v, dict) else v for k, v in ours.items()}
    out = {"layers": layers, "full_layers": full, "layer_gb": layer_gb,
           "bundle_gb": med["bundle_gb"] + extra_gb, "peak_rss_gb": med["peak_rss_gb"] + extra_gb}  # fmt: skip
    for key in ("decode_tok_s", "prefill_256_tok_s", "prefill_32_tok_s"):
        if key in med:
            out[key] = med[key] / f
    if "ttft_448_s" in med and "vision_448_s" in med:
        out["ttft_448_s"] = med["vision_448_s"] + (med["ttft_448_s"] - med["vision_448_s"]) * f
    return out


def scaled_markdown(s: dict) -> str:
    return (
        f"\nScaled from {s['layers']} to {s['full_layers']} decoder layers (one layer stores {s['layer_gb']:.3f} GB): "
        f"bundle {s['bundle_gb']:.2f} GB, peak RSS {s['peak_rss_gb']:.2f} GB; decode >= {s.get('decode_tok_s', 0):.3g} tok/s, "
        f"prefill 256 >= {s.get('prefill_256_tok_s', 0):.3g} tok/s, first token with a 448x448 picture "
        f"<= {s.get('ttft_448_s', 0):.3g} s (per-token times x {s['full_layers']}/{s['layers']}: upper bounds on time).\n"
    )
