"""The Qwen3-VL vision tower as one ONNX graph with nothing but dynamic lengths.

Every grid-dependent quantity is an input computed on the host (see ``runtime/vision_geometry.py``):
bilinear position-embedding taps and weights, 2-D rotary cos/sin, and the length of the attention
blocks. Patches arrive already in 2x2 merge order, so the mergers are plain reshapes; the graph
never sees a height or width.

Block attention: each image (each video frame) attends only to itself. One call carries blocks of
one length (frames of a video, or images of one size; the runtime groups the rest into separate
calls), so the patches reshape to a (blocks, block_len) batch with no padding and no mask. That is
what lets the fused form use ONNX Runtime's MultiHeadAttention, whose CPU kernel takes its flash
(tiled) path only without a mask: an 896x896 image's 3136-patch attention then needs ~50 MB of
scratch instead of two 630 MB score tensors (measured, ORT 1.32, 16 heads), and runs faster.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .. import graph_io as io
from ..config import VisionConfig
from .graph import MS_DOMAIN, Graph

P = "model.visual."


@dataclass(frozen=True)
class _Tower:
    """What every part of the tower needs: the graph, the geometry, the weights, the int8 choice,
    the graph inputs, and the attention form (chosen once: fused or portable)."""

    g: Graph
    cfg: VisionConfig
    w: Mapping[str, np.ndarray]
    int8: bool
    ins: dict[str, str]
    form: _Form

    def lin(self, x: str, prefix: str) -> str:
        return self.g.linear(x, self.w[prefix + ".weight"], self.w[prefix + ".bias"], prefix, int8=self.int8)


@dataclass(frozen=True)
class _Form:
    """One attention form: its rotary tables, its attention over (N, 3d) packed qkv, its tanh GELU."""

    rotary: Callable[[_Tower], tuple[str, str]]
    attend: Callable[[_Tower, str, str, str, str], str]
    gelu_tanh: Callable[[Graph, str], str]


def _blocks(t: _Tower, width: int) -> str:
    """Shape (-1, block_len, width): patches as a batch of attention blocks (one per frame)."""
    g = t.g
    return g.op("Concat", g.const([-1]), t.ins[io.BLOCK_LEN], g.const([width]), axis=0)


def _rotary_fused(t: _Tower) -> tuple[str, str]:
    """RotaryEmbedding takes the half-width angles per token: (N, hd) -> (B, L, hd / 2)."""
    g, hd, halves = t.g, t.cfg.head_dim, _blocks(t, t.cfg.head_dim // 2)
    cos, sin = (g.op("Reshape", g.op("Slice", t.ins[n], g.const([0]), g.const([hd // 2]), g.const([1])), halves)
                for n in (io.ROTARY_COS, io.ROTARY_SIN))  # fmt: skip
    return cos, sin


def _attend_fused(t: _Tower, qkv: str, cos: str, sin: str, _: str) -> str:
    """(N, 3d) -> 3 x (B, L, d), rotated there by one RotaryEmbedding each, MultiHeadAttention."""
    g, cfg = t.g, t.cfg
    q, k, v = (g.op("Reshape", x, _blocks(t, cfg.hidden_size)) for x in g.op("Split", qkv, axis=-1, num_outputs=3, n_out=3))
    q, k = (g.op("RotaryEmbedding", x, cos, sin, num_heads=cfg.num_heads) for x in (q, k))
    return g.op("MultiHeadAttention", q, k, v, domain=MS_DOMAIN, num_heads=cfg.num_heads, scale=cfg.head_dim**-0.5)


def _rotary_portable(t: _Tower) -> tuple[str, str]:
    """(N, 1, hd) tables for the rotate-half form over (N, H, hd)."""
    g = t.g
    return g.op("Unsqueeze", t.ins[io.ROTARY_COS], g.const([1])), g.op("Unsqueeze", t.ins[io.ROTARY_SIN], g.const([1]))


def _attend_portable(t: _Tower, qkv: str, cos: str, sin: str, _: str) -> str:
    """(N, 3, H, hd) -> 3 x (N, H, hd), rotated, -> (B, H, L, hd), softmax attention per block."""
    g, cfg = t.g, t.cfg
    heads, hd = cfg.num_heads, cfg.head_dim
    qkv = g.op("Reshape", qkv, g.const([0, 3, heads, hd]))
    q, k, v = (g.op("Squeeze", x, g.const([1])) for x in g.op("Split", qkv, axis=1, num_outputs=3, n_out=3))
    q, k = g.rotary(q, cos, sin), g.rotary(k, cos, sin)
    blocks = _blocks(t, cfg.hidden_size)
    q, k, v = (g.op("Transpose", g.op("Reshape", g.op("Reshape", x, blocks), g.const([0, 0, heads, hd])), perm=[0, 2, 1, 3])
               for x in (q, k, v))  # fmt: skip
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(hd**-0.5, np.float32))
    return g.op("Transpose", g.op("MatMul", g.op("Softmax", scores, axis=-1), v), perm=[0, 2, 1, 3])


FUSED = _Form(_rotary_fused, _attend_fused, lambda g, x: g.op("FastGelu", x, domain=MS_DOMAIN))
PORTABLE = _Form(_rotary_portable, _attend_portable, lambda g, x: g.gelu(x, "tanh"))


def _attention(t: _Tower, h: str, prefix: str, cos: str, sin: str) -> str:
    o = t.form.attend(t, t.lin(h, prefix + "qkv"), cos, sin, prefix)
    return t.lin(t.g.op("Reshape", o, t.g.const([-1, t.cfg.hidden_size])), prefix + "proj")


def _gelu(t: _Tower, x: str) -> str:
    """FastGelu is ONNX Runtime's vectorised kernel for exactly the tanh form."""
    return t.form.gelu_tanh(t.g, x) if t.cfg.hidden_act == "gelu_pytorch_tanh" else t.g.gelu(x, "none")


def _merger(t: _Tower, h: str, prefix: str, postshuffle: bool) -> str:
    """LayerNorm and 2x2 patch merge (in either order), then a two-layer MLP with exact GELU."""
    g, w, merged = t.g, t.w, t.cfg.merged_hidden_size
    norm = lambda x: g.layer_norm(x, w[prefix + "norm.weight"], w[prefix + "norm.bias"], prefix + "norm")  # noqa: E731
    if postshuffle:
        h = norm(g.op("Reshape", h, g.const([-1, merged])))
    else:
        h = g.op("Reshape", norm(h), g.const([-1, merged]))
    return t.lin(g.gelu(t.lin(h, prefix + "linear_fc1"), "none"), prefix + "linear_fc2")


def _block(t: _Tower, x: str, i: int, cos: str, sin: str) -> str:
    """One ViT block. Residual add + LayerNormalization, not SkipLayerNormalization: ORT's CPU
    kernel for the fused op was the slower one at the tower's sizes (profiled)."""
    g, w, b = t.g, t.w, f"{P}blocks.{i}."
    h = g.layer_norm(x, w[b + "norm1.weight"], w[b + "norm1.bias"], b + "norm1")
    x = g.op("Add", x, _attention(t, h, b + "attn.", cos, sin))
    h = g.layer_norm(x, w[b + "norm2.weight"], w[b + "norm2.bias"], b + "norm2")
    return g.op("Add", x, t.lin(_gelu(t, t.lin(h, b + "mlp.linear_fc1")), b + "mlp.linear_fc2"))


def build_vision(g: Graph, cfg: VisionConfig, w: Mapping[str, np.ndarray], progress: Callable[[int], object] | None = None,
                 int8: bool = False, fused: bool = True) -> None:  # fmt: skip
    """Emit the vision tower into ``g``; ``w`` maps HF tensor names to float32 arrays.

    ``int8`` runs the tower's linear layers through DynamicQuantizeMatMul (int8 per-channel weights,
    activations quantized per call). ``fused`` attends with MultiHeadAttention; otherwise with
    standard MatMul/Softmax ops (the portable reference).
    """
    ins_spec, outs_spec = io.vision_io(cfg)
    ins = {name: g.input(name, dt, shape) for name, (dt, shape) in ins_spec.items()}
    t = _Tower(g, cfg, w, int8, ins, FUSED if fused else PORTABLE)
    d = cfg.hidden_size
    # Conv3d with stride == kernel is a matmul over flattened (C, T, P, P) patches.
    x = g.linear(ins[io.PIXEL_VALUES], w[P + "patch_embed.proj.weight"].reshape(d, -1), w[P + "patch_embed.proj.bias"],
                 "patch_embed", int8=int8)  # fmt: skip
    # Bilinear interpolation of the learned position table: sum of 4 weighted rows.
    taps = g.op("Gather", g.weight("pos_embed.weight", w[P + "pos_embed.weight"]), ins[io.POS_INDICES], axis=0)
    weighted = g.op("Mul", taps, g.op("Unsqueeze", ins[io.POS_WEIGHTS], g.const([-1])))
    x = g.op("Add", x, g.op("ReduceSum", weighted, g.const([1]), keepdims=0))
    cos, sin = t.form.rotary(t)
    deepstack = []
    for i in range(cfg.depth):
        x = _block(t, x, i, cos, sin)
        if i in cfg.deepstack_visual_indexes:
            k = cfg.deepstack_visual_indexes.index(i)
            deepstack.append(_merger(t, x, f"{P}deepstack_merger_list.{k}.", True))
        if progress:
            progress(1)
    g.output(_merger(t, x, P + "merger.", False), io.IMAGE_EMBEDS, *outs_spec[io.IMAGE_EMBEDS])
    # Layer order, as transformers appends them: decoder layer j receives the j-th one produced.
    stacked = g.op("Concat", *(g.op("Unsqueeze", f, g.const([0])) for f in deepstack), axis=0)
    g.output(stacked, io.DEEPSTACK_FEATURES, *outs_spec[io.DEEPSTACK_FEATURES])
