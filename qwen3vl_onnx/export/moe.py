"""Qwen3-VL-MoE's sparse MLP: a router over ``num_experts`` SwiGLU experts, top-k of them per token.

    logits = x @ router^T                       (fp32, no bias)
    p = softmax(logits); keep the top k; p /= sum(p over those k)
    y = sum_k p_k * down_k(silu(gate_k(x)) * up_k(x))

Fused form: ONNX Runtime's ``MoE`` (float experts) or ``QMoE`` (4/8-bit blocks in MatMulNBits'
layout) does routing, both GEMMs and the weighted sum in one kernel per layer; it takes the router
logits (softmax, top-k and renormalisation happen inside) and only the interleaved gate/up layout
(``swiglu_fusion=1``: row 2j is gate j, row 2j+1 is up j). Portable form: standard ONNX ops that
run every expert on every token and weight the results by the (mostly zero) routing matrix; right,
but num_experts / k times the expert work of the fused form, so it is a reference, not a way to run
30B-A3B.

Experts are read one at a time from the checkpoint and written as they are quantized, so a layer's
experts are never in memory at once (1.2 GB of bf16 per layer at 30B-A3B).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from ..config import TextConfig
from ..errors import UserError
from .graph import MS_DOMAIN, Graph
from .quant import quantize

GATE_UP, DOWN, ROUTER = "experts.gate_up_proj", "experts.down_proj", "gate.weight"
LAYERS = "model.language_model.layers."


def _shape(w: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    shape = getattr(w, "shape", None)  # a Checkpoint knows shapes without reading
    return tuple(shape(name)) if callable(shape) else tuple(w[name].shape)


def experts_transposed(w: Mapping[str, np.ndarray], cfg: TextConfig) -> bool:
    """Whether the checkpoint's experts are in the layout transformers 5 saves ((E, 2I, H) and
    (E, H, I), each expert a torch linear weight) rather than the released one ((E, H, 2I) and
    (E, I, H)). Decided on the first MoE layer by the down projection, or by gate_up when hidden ==
    moe_intermediate_size makes down's two layouts the same shape; False for a dense model or when
    the tensors are missing (the weight check then names them)."""
    if not cfg.moe_layers:
        return False
    prefix = f"{LAYERS}{cfg.moe_layers[0]}.mlp."
    if prefix + DOWN not in w or prefix + GATE_UP not in w:
        return False
    h, m = cfg.hidden_size, cfg.moe_intermediate_size
    if h != m:
        return _shape(w, prefix + DOWN)[1:] == (h, m)
    return _shape(w, prefix + GATE_UP)[1:] == (2 * m, h)


class Experts:
    """One MoE layer's weights, read expert by expert, as torch linear weights (out, in)."""

    def __init__(self, w: Mapping[str, np.ndarray], prefix: str, cfg: TextConfig, transposed: bool):
        self.w, self.prefix, self.cfg, self.transposed = w, prefix, cfg, transposed

    def _part(self, name: str, e: int) -> np.ndarray:
        part = getattr(self.w, "part", None)
        return part(self.prefix + name, e) if callable(part) else np.asarray(self.w[self.prefix + name][e])

    def gate_up(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Expert ``e``'s gate and up weights, each (moe_inter, hidden)."""
        gu = self._part(GATE_UP, e)
        gu = gu if self.transposed else gu.T
        m = self.cfg.moe_intermediate_size
        return gu[:m], gu[m:]

    def interleaved(self, e: int) -> np.ndarray:
        """(2 * moe_inter, hidden) with gate and up rows alternating: what the fused kernels take."""
        gate, up = self.gate_up(e)
        out = np.empty((2 * gate.shape[0], gate.shape[1]), np.float32)
        out[0::2], out[1::2] = gate, up
        return out

    def down(self, e: int) -> np.ndarray:
        """Expert ``e``'s down weight, (hidden, moe_inter)."""
        d = self._part(DOWN, e)
        return d if self.transposed else d.T

    def router(self) -> np.ndarray:
        return np.asarray(self.w[self.prefix + ROUTER], np.float32)


EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def check_expert_widths(cfg: TextConfig, bits: dict[str, int]) -> None:
    """Refuse an export whose experts would mix weight widths (``bits``: each of
    ``EXPERT_PROJECTIONS``' bits, from ``--int8-projections``): ONNX Runtime's CPU QMoE runs one
    width for all of an expert's matrices and fails at the first call otherwise, which would be
    after minutes of export."""
    if cfg.moe_layers and len({bits[k] for k in EXPERT_PROJECTIONS}) > 1:
        wide = [k for k in EXPERT_PROJECTIONS if bits[k] == max(bits.values())]
        why = "ONNX Runtime's CPU QMoE has no mixed widths"
        raise UserError(f"--int8-projections {','.join(wide)}: this MoE checkpoint's experts need gate_proj, up_proj and "
                        f"down_proj at one width ({why}); list all three or none")  # fmt: skip


def expert_block_size(cfg: TextConfig, block_size: int) -> int:
    """The quantization block of expert weights: QMoE needs both K's (hidden and moe_inter) to be
    whole blocks, so the largest power of two up to ``block_size`` that divides both."""
    b = block_size
    while b >= 16 and (cfg.hidden_size % b or cfg.moe_intermediate_size % b):
        b //= 2
    if b < 16:
        raise UserError(f"hidden_size {cfg.hidden_size} and moe_intermediate_size {cfg.moe_intermediate_size} share no "
                        "quantization block of 16 or more (QMoE needs whole blocks)")  # fmt: skip
    return b


def _router_logits(g: Graph, x: str, ex: Experts) -> str:
    """(B, S, E) router logits, the router kept in fp32 in every precision."""
    return g.op("MatMul", x, g.weight(ex.prefix + ROUTER, ex.router().T, np.float32))


def _quantized(g: Graph, name: str, mats: Iterator[np.ndarray], shape: tuple[int, int, int], bits: int, block: int) -> list[str]:
    """Stacked (E, N, K) expert weights as QMoE inputs: packed blocks (streamed), scales, zero points."""
    e, n, k = shape
    scales: list[np.ndarray] = []
    zero_points: list[np.ndarray] = []

    def packed() -> Iterator[np.ndarray]:
        for m in mats:
            q = quantize(m, bits, block)
            scales.append(q.scales.reshape(n, -1))
            if q.zero_points is not None:
                zero_points.append(q.zero_points.reshape(n, -1))
            yield q.packed.reshape(n, -1)

    weight = g.weight_parts(name + ".qweight", (e, n, k * bits // 8), packed(), np.uint8)
    zp = g.weight(name + ".zero_points", np.stack(zero_points), np.uint8) if zero_points else ""
    return [weight, g.weight(name + ".scales", np.stack(scales), np.float32), zp]


def fused_moe(g: Graph, x: str, ex: Experts, bits: tuple[int, int], block_size: int, accuracy_level: int) -> str:
    """The layer as one ``MoE`` (float) or ``QMoE`` node; ``bits``: (gate/up, down) weight bits, 0 = float."""
    t = ex.cfg
    e, h, m = t.num_experts, t.hidden_size, t.moe_intermediate_size
    logits = g.op("Reshape", _router_logits(g, x, ex), g.const([-1, e]))
    attrs = dict(k=t.num_experts_per_tok, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                 activation_beta=0.0, normalize_routing_weights=1, domain=MS_DOMAIN)  # fmt: skip
    fc1, fc2 = ex.prefix + "experts.fc1", ex.prefix + "experts.fc2"
    if not any(bits):
        w1 = g.weight_parts(fc1, (e, 2 * m, h), (ex.interleaved(i) for i in range(e)))
        w2 = g.weight_parts(fc2, (e, h, m), (ex.down(i) for i in range(e)))
        return g.op("MoE", x, logits, w1, "", w2, **attrs)
    if not all(bits):
        raise ValueError("QMoE experts are all quantized or all float")
    block = expert_block_size(t, block_size)
    w1, s1, z1 = _quantized(g, fc1, (ex.interleaved(i) for i in range(e)), (e, 2 * m, h), bits[0], block)
    w2, s2, z2 = _quantized(g, fc2, (ex.down(i) for i in range(e)), (e, h, m), bits[1], block)
    if bits[1] != bits[0]:
        attrs["fc2_expert_weight_bits"] = bits[1]
    return g.op("QMoE", x, logits, w1, s1, "", w2, s2, "", "", "", "", z1, z2, expert_weight_bits=bits[0],
                block_size=block, accuracy_level=accuracy_level, weights_prepacked=0, **attrs)  # fmt: skip


def portable_moe(g: Graph, x: str, ex: Experts) -> str:
    """The layer in standard ONNX ops: every expert on every token, weighted by the routing matrix
    (zero outside each token's top k), which is exact and num_experts / k times the work."""
    t = ex.cfg
    e, h, m, k = t.num_experts, t.hidden_size, t.moe_intermediate_size, t.num_experts_per_tok
    probs = g.op("Softmax", g.op("Reshape", _router_logits(g, x, ex), g.const([-1, e])), axis=-1)  # (N, E)
    top, idx = g.op("TopK", probs, g.const([k]), axis=-1, n_out=2)
    top = g.op("Div", top, g.op("ReduceSum", top, g.const([-1]), keepdims=1))
    route = g.op("ScatterElements", g.op("Mul", probs, g.const(0.0, np.float32)), idx, top, axis=-1)  # (N, E)
    # (1, N, H) @ (E, H, 2I) -> (E, N, 2I): the released layout is already MatMul's right operand
    gate_up = g.weight_parts(ex.prefix + "experts.gate_up", (e, h, 2 * m),
                             (np.concatenate(ex.gate_up(i)).T for i in range(e)))  # fmt: skip
    a = g.op("MatMul", g.op("Reshape", x, g.const([1, -1, h])), gate_up)
    gate, up = g.op("Split", a, axis=-1, num_outputs=2, n_out=2)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    down = g.weight_parts(ex.prefix + "experts.down", (e, m, h), (ex.down(i).T for i in range(e)))
    y = g.op("MatMul", act, down)  # (E, N, H)
    weights = g.op("Unsqueeze", g.op("Transpose", route, perm=[1, 0]), g.const([2]))  # (E, N, 1)
    y = g.op("ReduceSum", g.op("Mul", y, weights), g.const([0]), keepdims=0)  # (N, H)
    return g.op("Reshape", y, g.op("Shape", x))
