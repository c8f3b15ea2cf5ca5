"""The int8 KV cache: scales from measured ranges, and the pass that turns a decoder graph's float
cache into an int8 one.

ONNX Runtime's ``GroupQueryAttention`` keeps an int8 cache when told its bit width and given static
scales: new keys and values are quantized on write (symmetric, saturating), past ones dequantized as
they are read. The cache is about a quarter of the float one, and decode attention, which reads the whole
cache every step, gets about twice as fast at 1000+ cached tokens (docs/BENCHMARKS.md).

Channels differ in range (the k_norm weights, the rotary pairing, a few wide value channels), so
each (kv head, channel) gets its own step. The kernel reads a per-tensor cache faster than a
per-channel one (one multiply after each dot product instead of one per element: a 4B step's
attention over 2000 cached tokens 15-20% faster, docs/BENCHMARKS.md), so the per-channel steps are
moved out of the kernel into the graph: keys and values are divided by their channel's step over
the layer's widest before the cache (``equalizer``), queries are multiplied by the keys' factor (so
every score q.k is unchanged) and the attention output by the values' (each output channel is a
weighted sum of one value channel). The cache then holds exactly the codes a per-channel scale
would give, under one scale per layer.

The first layer keeps its float cache (``FLOAT_LAYERS``): its keys and values come straight from
the token embeddings, and an error there passes through every later layer. Measured on random 2B
and 4B checkpoints (docs/BENCHMARKS.md): with every layer int8 the last logits' cosine against the
float cache was 0.9963-0.9988; with layer 0 float 0.9990-0.9993, while a float cache on any six
later layers together changed the fifth decimal only. The cost: one layer of four-byte cache.
Export checks the result on each bundle and keeps more first layers float where the check asks
(``float_layer_choices``, ``AGREEMENT_BAR``).

The pass works on the graph file alone (weights stay in the shared ``.data`` file), so a bundle
holds both cache forms for the cost of a second small ``.onnx``: the float one that calibration
runs on and that ``--kv-cache fp32`` chooses, and the int8 one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .. import graph_io as io

# The kernel's quantization type: one scale per layer for keys and one for values, over channels
# equalized in the graph (see above). "PER_CHANNEL" hands the same steps to the kernel instead.
QUANT_TYPE = "PER_TENSOR"
# Headroom over the largest value calibration saw (values beyond the scale saturate), and the
# smallest range a channel may get relative to its head's widest (a channel quiet in calibration
# may not stay so). Why this much: saturation, not resolution, is what costs accuracy. On the
# trained shapes model, whose prompts reach up to 2.45x the calibrated range in some channels,
# headroom 1.25 gave a last-token logit cosine against the float cache of mean 0.99936, min 0.985
# over 40 held-out prompts; 2.0 gave mean 1.00000, min 0.99997 (docs/BENCHMARKS.md).
HEADROOM = 2.0
FLOOR = 0.25
# Layers 0..FLOAT_LAYERS-1 keep a float cache in the int8-cache graph (see above); export adds more
# where the agreement check asks for them (``float_layer_choices``).
FLOAT_LAYERS = 1
# An export whose cache precision is left to it ("auto") makes the int8 cache the bundle's default
# only where, on the calibration conversations, its logits agree with the float cache's at least
# this closely (mean cosine over each conversation's last answer positions). Why a check per bundle:
# the agreement depends on the checkpoint (random 4B weights 0.9971-0.9989 before layer 0 stayed
# float, the trained shapes model 1.00000), and a user who did not ask for int8 should not get a
# cache measurably off the float one.
AGREEMENT_BAR = 0.999


class KVCalibrator(Protocol):
    """What an export asks of calibration (``qwen3vl_onnx.calibration.Calibrator``; passed in because
    measuring runs the runtime, a layer above the exporter)."""

    def ranges(self, bundle: Path) -> np.ndarray:
        """(layers, 2, kv_heads, head_dim) largest |key| / |value|, measured on the float cache."""
        ...

    def agreement(self, bundle: Path, graph_file: str) -> list[float]:
        """Per calibration conversation, the logit cosine of int8-cache graph ``graph_file`` against the float cache."""
        ...


def float_layer_choices(layers: int) -> range:
    """How many first layers keep a float cache, in the order export tries them: ``FLOAT_LAYERS``
    first, then one more at a time up to an eighth of the layers. Why more than one may be needed:
    on random 4B weights the calibration conversations' cosine is 0.99890 with layer 0 float,
    0.99919 with layers 0-1, 0.99935 with 0-2 (the early layers' errors pass through every later
    one); an eighth keeps the cache under ~0.35x the float one's bytes."""
    return range(FLOAT_LAYERS, max(FLOAT_LAYERS, layers // 8) + 1)


def agreement_entry(tried: dict[int, list[float]]) -> dict[str, Any]:
    """The manifest's record of the agreement check: the cosines of the last graph tried (the one
    the bundle keeps), and the mean of every float-layer count tried."""
    cosines = tried[max(tried)]
    return {"mean_cosine": round(float(np.mean(cosines)), 6), "min_cosine": round(float(np.min(cosines)), 6),
            "conversations": len(cosines), "bar": AGREEMENT_BAR,
            "float_layers_tried": {str(f): round(float(np.mean(c)), 6) for f, c in tried.items()}}  # fmt: skip


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


def equalizer_name(layer: int, kind: str) -> str:
    """The graph's per-channel factor on ``kind`` (query, key, value, output) of ``layer``."""
    return f"kv_equalize.{kind}.{layer}"


def equalizer(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kv_heads, head_dim) per-channel steps of one layer's keys or values -> (the one step the
    kernel gets, each channel's step over it, at most 1)."""
    top = scales.max()
    return np.array([top], np.float32), (scales / top).astype(np.float32)


def int8_cache_graph(src: Path, dst: Path, scales: np.ndarray, quant_type: str = QUANT_TYPE,
                     float_layers: int = FLOAT_LAYERS) -> onnx.ModelProto:  # fmt: skip
    """Write ``dst``: the decoder graph ``src`` with an int8 cache quantized by ``scales``
    ((layers, 2, kv_heads, head_dim), from ``scales_from_ranges``): "PER_TENSOR" over channels
    equalized in the graph, or "PER_CHANNEL" in the kernel (the same codes either way); the first
    ``float_layers`` layers keep their float cache. Weights are referenced, not copied, so ``dst``
    must sit beside ``src``'s data file."""
    if quant_type not in ("PER_TENSOR", "PER_CHANNEL"):
        raise ValueError(f"quant_type must be PER_TENSOR or PER_CHANNEL, got {quant_type!r}")
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    cache_names = set()
    layers = 0
    nodes = []
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        layer = int(node.input[3].rsplit(".", 1)[1])  # past_key.{layer}
        if node.input[3] != io.past_key(layer) or len(node.input) != 7:
            raise ValueError(f"{src}: attention node {node.name} is not this exporter's GroupQueryAttention")
        layers += 1
        if layer < float_layers:
            nodes.append(node)
            continue
        if quant_type == "PER_CHANNEL":
            kernel_scales = [s[None, :, None, :] for s in scales[layer]]
        else:
            (k_top, k_eq), (v_top, v_eq) = equalizer(scales[layer][0]), equalizer(scales[layer][1])
            kernel_scales = [k_top, v_top]
            nodes.extend(_equalize_inputs(g, node, layer, k_eq, v_eq))
        names = []
        for kind, s in zip(("key", "value"), kernel_scales, strict=True):
            g.initializer.append(numpy_helper.from_array(s.astype(np.float32), kv_scale_name(layer, kind)))
            names.append(kv_scale_name(layer, kind))
        node.input.extend(["", "", "", "", "", *names])  # cos/sin cache, position ids, bias, head sink: unused
        node.attribute.extend([onnx.helper.make_attribute("kv_cache_bit_width", 8),
                               onnx.helper.make_attribute("k_quant_type", quant_type),
                               onnx.helper.make_attribute("v_quant_type", quant_type)])  # fmt: skip
        nodes.append(node)
        if quant_type == "PER_TENSOR":
            nodes.append(_equalize_output(g, node, layer, v_eq))
        cache_names |= {io.past_key(layer), io.past_value(layer), io.present_key(layer), io.present_value(layer)}
    if layers != len(scales):
        raise ValueError(f"{src}: {layers} attention layers, scales for {len(scales)}")
    del g.node[:]
    g.node.extend(nodes)
    for v in [*g.input, *g.output]:
        if v.name in cache_names:
            v.type.tensor_type.elem_type = TensorProto.INT8
    onnx.save_model(model, str(dst))
    return model


def _group(eq: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """(kv_heads, head_dim) factors spread over the query heads that share each kv head, flat."""
    heads = next(a.i for a in node.attribute if a.name == "num_heads")
    return np.repeat(eq, heads // eq.shape[0], axis=0).reshape(-1)


def _mul(g: onnx.GraphProto, x: str, factor: np.ndarray, name: str, out: str) -> onnx.NodeProto:
    g.initializer.append(numpy_helper.from_array(factor.astype(np.float32), name))
    return onnx.helper.make_node("Mul", [x, name], [out], name=name)


def _equalize_inputs(g: onnx.GraphProto, node: onnx.NodeProto, layer: int, k_eq: np.ndarray,
                     v_eq: np.ndarray) -> list[onnx.NodeProto]:  # fmt: skip
    """Queries times the keys' factors; keys and values over theirs (the node's inputs rewired)."""
    made = []
    for slot, kind, factor in ((0, "query", _group(k_eq, node)), (1, "key", 1 / k_eq.reshape(-1)),
                               (2, "value", 1 / v_eq.reshape(-1))):  # fmt: skip
        name = equalizer_name(layer, kind)
        made.append(_mul(g, node.input[slot], factor, name, f"{name}.out"))
        node.input[slot] = f"{name}.out"
    return made


def _equalize_output(g: onnx.GraphProto, node: onnx.NodeProto, layer: int, v_eq: np.ndarray) -> onnx.NodeProto:
    """The attention output times the values' factors, under the output's old name."""
    name = equalizer_name(layer, "output")
    out = node.output[0]
    node.output[0] = f"{name}.in"
    return _mul(g, f"{name}.in", _group(v_eq, node), name, out)
