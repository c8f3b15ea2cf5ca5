"""The int8 KV cache: scales from measured ranges, and the pass that turns a decoder graph's float
cache into an int8 one.

ONNX Runtime's ``GroupQueryAttention`` keeps an int8 cache when told its bit width and given static
scales: new keys and values are quantized on write (symmetric, saturating), past ones dequantized as
they are read. The cache is a quarter of the float one, and decode attention, which reads the whole
cache every step, gets about twice as fast at 1000+ cached tokens (docs/BENCHMARKS.md).

The pass works on the graph file alone (weights stay in the shared ``.data`` file), so a bundle
holds both cache forms for the cost of a second small ``.onnx``: the float one that calibration
runs on and that ``--kv-cache fp32`` chooses, and the int8 one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .. import graph_io as io

# How the scales are cut: one per (kv head, channel) of each layer. Per channel, because keys'
# channels differ in range by the k_norm weights and the rotary pairing (a per-tensor scale spends
# its steps on the widest channel); measured in docs/BENCHMARKS.md ("int8 KV cache").
QUANT_TYPE = "PER_CHANNEL"
# Headroom over the largest value calibration saw (values beyond the scale saturate), and the
# smallest range a channel may get relative to its head's widest (a channel quiet in calibration
# may not stay so). Why this much: saturation, not resolution, is what costs accuracy. On the
# trained shapes model, whose prompts reach up to 2.45x the calibrated range in some channels,
# headroom 1.25 gave a last-token logit cosine against the float cache of mean 0.99936, min 0.985
# over 40 held-out prompts; 2.0 gave mean 1.00000, min 0.99997 (docs/BENCHMARKS.md).
HEADROOM = 2.0
FLOOR = 0.25


def scales_from_ranges(ranges: np.ndarray) -> np.ndarray:
    """(layers, 2, kv_heads, head_dim) largest |key| / |value| seen -> int8 scales of the same shape."""
    ranges = np.asarray(ranges, np.float64)
    if ranges.ndim != 4 or ranges.shape[1] != 2 or not np.isfinite(ranges).all():
        raise ValueError(f"KV ranges must be finite (layers, 2, kv_heads, head_dim), got {ranges.shape}")
    widest = ranges.max(axis=3, keepdims=True)
    top = np.maximum(ranges * HEADROOM, widest * FLOOR)
    return (np.where(top > 0, top, 1.0) / 127.0).astype(np.float32)


def kv_scale_name(layer: int, kind: str) -> str:
    return f"kv_scale.{kind}.{layer}"


def int8_cache_graph(src: Path, dst: Path, scales: np.ndarray, quant_type: str = QUANT_TYPE) -> onnx.ModelProto:
    """Write ``dst``: the decoder graph ``src`` with an int8 cache quantized by ``scales``
    ((layers, 2, kv_heads, head_dim), from ``scales_from_ranges``; "PER_TENSOR" keeps each
    layer's largest). Weights are referenced, not copied, so ``dst`` must sit beside ``src``'s
    data file."""
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    cache_names = set()
    layers = 0
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = int(node.input[3].rsplit(".", 1)[1])  # past_key.{layer}
        if node.input[3] != io.past_key(layer) or len(node.input) != 7:
            raise ValueError(f"{src}: attention node {node.name} is not this exporter's GroupQueryAttention")
        names = []
        for kind, s in zip(("key", "value"), scales[layer], strict=True):
            name = kv_scale_name(layer, kind)
            s = s.max().reshape(1) if quant_type == "PER_TENSOR" else s[None, :, None, :]
            g.initializer.append(numpy_helper.from_array(s.astype(np.float32), name))
            names.append(name)
        node.input.extend(["", "", "", "", "", *names])  # cos/sin cache, position ids, bias, head sink: unused
        node.attribute.extend([onnx.helper.make_attribute("kv_cache_bit_width", 8),
                               onnx.helper.make_attribute("k_quant_type", quant_type),
                               onnx.helper.make_attribute("v_quant_type", quant_type)])  # fmt: skip
        cache_names |= {io.past_key(layer), io.past_value(layer), io.present_key(layer), io.present_value(layer)}
        layers += 1
    if layers != len(scales):
        raise ValueError(f"{src}: {layers} attention layers, scales for {len(scales)}")
    for v in [*g.input, *g.output]:
        if v.name in cache_names:
            v.type.tensor_type.elem_type = TensorProto.INT8
    onnx.save_model(model, str(dst))
    return model
