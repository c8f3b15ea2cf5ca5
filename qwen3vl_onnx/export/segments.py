"""Runs of consecutive layers of a fused decoder graph as graphs of their own, over the same weights.

Why: measuring the int8 KV cache's ranges runs the decoder on calibration prompts, and a session of
the whole decoder holds every weight at once (prepacked, ~16 GB for a 30B-A3B int4 decoder), far
above what streaming the export needs. A few layers at a time, each run's graph reading the bundle's
``decoder.onnx.data`` and the hidden state passed from one run to the next, peak at one run's weights.

A run's graph takes the residual stream where its first layer's ``input_layernorm`` reads it (one
tensor, or the two a fused SkipSimplifiedLayerNormalization adds), the decoder inputs its nodes use
(positions, DeepStack rows, the cache's lengths) and its layers' past keys and values; it returns
their present keys and values and the residual stream entering the next run (after the last
layer: the final norm). The head (final norm and lm_head) is a graph of its own, ``head``: checking
the int8 cache's logits loads it once, apart from any layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from .. import graph_io as io

LAYER_PREFIX = "model.language_model.layers."
# The nodes that read a layer's input_layernorm weight in a fused decoder graph; the residual
# stream is their non-weight inputs.
NORM_OPS = ("RMSNormalization", "SkipSimplifiedLayerNormalization")
FINAL_NORM = "model.language_model.norm.weight"


@dataclass(frozen=True)
class Segment:
    """Layers ``first`` to ``stop - 1``: their graph, and the tensor names carrying the residual
    stream in (``inputs``) and out to the next segment (``outputs``; for the last, into the final norm)."""

    first: int
    stop: int
    model: onnx.ModelProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _norm_readers(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], set[str]]:
    """Each norm node by the tensors it reads, and the graph's weight names."""
    return {x: n for n in graph.node if n.op_type in NORM_OPS for x in n.input}, {t.name for t in graph.initializer}


def residual_inputs(graph: onnx.GraphProto, layers: int) -> list[tuple[str, ...]]:
    """For each layer, the tensors that carry the residual stream into it."""
    readers, weights = _norm_readers(graph)
    out = []
    for i in range(layers):
        node = readers.get(f"{LAYER_PREFIX}{i}.input_layernorm.weight")
        if node is None:
            raise ValueError(f"no {' or '.join(NORM_OPS)} node reads layer {i}'s input_layernorm weight")
        out.append(tuple(t for t in node.input if t and t not in weights))
    return out


def final_inputs(graph: onnx.GraphProto) -> tuple[str, ...]:
    """The tensors that carry the residual stream into the final norm (the last layer's output)."""
    readers, weights = _norm_readers(graph)
    node = readers.get(FINAL_NORM)
    if node is None:
        raise ValueError(f"no {' or '.join(NORM_OPS)} node reads the final norm's weight")
    return tuple(t for t in node.input if t and t not in weights)


def layer_bytes(graph: onnx.GraphProto, layers: int) -> list[int]:
    """Bytes of each layer's weights (external data lengths, or the raw bytes of inline ones)."""
    sizes = [0] * layers
    for t in graph.initializer:
        if not t.name.startswith(LAYER_PREFIX):
            continue
        i = int(t.name[len(LAYER_PREFIX) :].split(".", 1)[0])
        ext = {e.key: e.value for e in t.external_data}
        sizes[i] += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return sizes


def plan(sizes: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive layer runs ``(first, stop)`` of at most ``budget`` weight bytes each (a layer
    larger than the budget is a run of its own)."""
    runs, first, total = [], 0, 0
    for i, s in enumerate(sizes):
        if i > first and total + s > budget:
            runs.append((first, i))
            first, total = i, 0
        total += s
    if sizes:
        runs.append((first, len(sizes)))
    return runs


def upstream(graph: onnx.GraphProto, wanted: list[str], stop: tuple[str, ...]) -> set[int]:
    """The positions in ``graph.node`` of the nodes that the tensors ``wanted`` depend on, not looking
    past those in ``stop`` (positions, not ids: protobuf hands out a new wrapper per access)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    kept: set[int] = set()
    todo, seen = list(wanted), set(stop)
    while todo:
        t = todo.pop()
        if t in seen or t not in producer:
            continue
        seen.add(t)
        i = producer[t]
        if i not in kept:
            kept.add(i)
            todo.extend(x for x in graph.node[i].input if x)
    return kept


def cut(model: onnx.ModelProto, name: str, ins: tuple[str, ...], wanted: list[str]) -> onnx.ModelProto:
    """The nodes computing the tensors ``wanted`` from ``ins`` and the decoder's inputs, in their
    original (topological) order, with the weights they read: a graph of its own named ``name``."""
    g = model.graph
    kept = upstream(g, wanted, ins)
    nodes = [n for i, n in enumerate(g.node) if i in kept]
    read = {x for n in nodes for x in n.input}
    residual = lambda t: helper.make_tensor_value_info(t, TensorProto.FLOAT, ["batch", "seq", "hidden"])  # noqa: E731
    inputs = [residual(t) for t in ins] + [v for v in g.input if v.name in read and v.name not in ins]
    outputs = {v.name: v for v in g.output}
    graph = helper.make_graph(nodes, name, inputs, [outputs.get(t) or residual(t) for t in wanted],
                              [t for t in g.initializer if t.name in read])  # fmt: skip
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def extract(model: onnx.ModelProto, first: int, stop: int, ins: tuple[str, ...], outs: tuple[str, ...]) -> onnx.ModelProto:
    """Layers ``first..stop-1``: their presents and ``outs`` from ``ins`` and the decoder's inputs."""
    wanted = [name for i in range(first, stop) for name in (io.present_key(i), io.present_value(i))] + list(outs)
    return cut(model, f"layers_{first}_{stop}", ins, wanted)


def segments(model: onnx.ModelProto, layers: int, budget: int) -> list[Segment]:
    """The decoder ``model`` (loaded without its external data) cut into runs of layers of at most
    ``budget`` weight bytes."""
    carry = residual_inputs(model.graph, layers)
    out = []
    for first, stop in plan(layer_bytes(model.graph, layers), budget):
        nxt = carry[stop] if stop < layers else final_inputs(model.graph)
        out.append(Segment(first, stop, extract(model, first, stop, carry[first], nxt), carry[first], nxt))
    return out


def head(model: onnx.ModelProto) -> onnx.ModelProto:
    """The decoder ``model``'s final norm and lm_head: the residual stream leaving the last layer
    (``final_inputs``) and the decoder inputs they read (``logits_to_keep``) to the logits."""
    return cut(model, "head", final_inputs(model.graph), [io.LOGITS])
