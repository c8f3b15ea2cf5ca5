"""The Qwen3-VL vision tower as one ONNX graph with nothing but dynamic lengths.

Every grid-dependent quantity is an input computed on the host (see ``runtime/vision_geometry.py``):
bilinear position-embedding taps and weights, 2-D rotary cos/sin, and the per-image (per-frame)
attention blocks as gather/scatter indices plus a key mask. Patches arrive already in 2x2 merge
order, so the mergers are plain reshapes. One call can therefore carry any number of images of any
size; the graph never sees a height or width.

Block attention: tokens are gathered into a (blocks, longest block) batch, attended with a key mask
and scattered back, so memory grows with the largest image squared, never with all images squared.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..config import VisionConfig
from .graph import FLOAT, INT64, Graph

P = "model.visual."

VISION_INPUTS = {
    "pixel_values": (FLOAT, ["patches", "patch_dim"]),
    "pos_indices": (INT64, ["patches", 4]),
    "pos_weights": (FLOAT, ["patches", 4]),
    "rotary_cos": (FLOAT, ["patches", "head_dim"]),
    "rotary_sin": (FLOAT, ["patches", "head_dim"]),
    "attn_gather": (INT64, ["blocks", "block_len"]),
    "attn_mask": (FLOAT, ["blocks", "block_len"]),
    "attn_scatter": (INT64, ["patches"]),
}


def build_vision(g: Graph, cfg: VisionConfig, w: Mapping[str, np.ndarray], progress=None, int8: bool = False) -> None:
    """Emit the vision tower into ``g``; ``w`` maps HF tensor names to float32 arrays.

    ``int8`` runs the tower's linear layers through DynamicQuantizeMatMul (int8 per-channel weights,
    activations quantized per call).
    """
    ins = {name: g.input(name, t, shape) for name, (t, shape) in VISION_INPUTS.items()}
    d, heads, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim

    def lin(x: str, prefix: str) -> str:
        return g.linear(x, w[prefix + ".weight"], w[prefix + ".bias"], prefix, int8=int8)

    # Conv3d with stride == kernel is a matmul over flattened (C, T, P, P) patches.
    patch_w = w[P + "patch_embed.proj.weight"].reshape(d, -1)
    x = g.linear(ins["pixel_values"], patch_w, w[P + "patch_embed.proj.bias"], "patch_embed", int8=int8)

    # Bilinear interpolation of the learned position table: sum of 4 weighted rows.
    table = g.weight("pos_embed.weight", w[P + "pos_embed.weight"])
    taps = g.op("Gather", table, ins["pos_indices"], axis=0)
    weighted = g.op("Mul", taps, g.op("Unsqueeze", ins["pos_weights"], g.const([-1])))
    x = g.op("Add", x, g.op("ReduceSum", weighted, g.const([1]), keepdims=0))

    cos = g.op("Unsqueeze", ins["rotary_cos"], g.const([1]))  # (N, 1, hd)
    sin = g.op("Unsqueeze", ins["rotary_sin"], g.const([1]))
    key_mask = g.op("Unsqueeze", ins["attn_mask"], g.const([1, 2]))  # (B, 1, 1, L)
    scale = g.const(hd**-0.5, np.float32)

    def attention(h: str, prefix: str) -> str:
        qkv = lin(h, prefix + "qkv")
        qkv = g.op("Reshape", qkv, g.const([0, 3, heads, hd]))
        q, k, v = (g.op("Squeeze", t, g.const([1])) for t in g.op("Split", qkv, axis=1, num_outputs=3, n_out=3))
        q, k = g.rotary(q, cos, sin), g.rotary(k, cos, sin)
        # (N, H, hd) -> (B, L, H, hd) -> (B, H, L, hd)
        q, k, v = (g.op("Transpose", g.op("Gather", t, ins["attn_gather"], axis=0), perm=[0, 2, 1, 3]) for t in (q, k, v))
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
        probs = g.op("Softmax", g.op("Add", scores, key_mask), axis=-1)
        o = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])  # (B, L, H, hd)
        o = g.op("Gather", g.op("Reshape", o, g.const([-1, d])), ins["attn_scatter"], axis=0)
        return lin(o, prefix + "proj")

    def merger(h: str, prefix: str, postshuffle: bool) -> str:
        norm = lambda t: g.layer_norm(t, w[prefix + "norm.weight"], w[prefix + "norm.bias"], prefix + "norm")  # noqa: E731
        h = (
            norm(g.op("Reshape", h, g.const([-1, cfg.merged_hidden_size])))
            if postshuffle
            else g.op("Reshape", norm(h), g.const([-1, cfg.merged_hidden_size]))
        )
        return lin(g.gelu(lin(h, prefix + "linear_fc1"), "none"), prefix + "linear_fc2")

    act = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"
    deepstack = []
    for i in range(cfg.depth):
        b = f"{P}blocks.{i}."
        h = g.layer_norm(x, w[b + "norm1.weight"], w[b + "norm1.bias"], b + "norm1")
        x = g.op("Add", x, attention(h, b + "attn."))
        h = g.layer_norm(x, w[b + "norm2.weight"], w[b + "norm2.bias"], b + "norm2")
        h = lin(g.gelu(lin(h, b + "mlp.linear_fc1"), act), b + "mlp.linear_fc2")
        x = g.op("Add", x, h)
        if i in cfg.deepstack_visual_indexes:
            k = cfg.deepstack_visual_indexes.index(i)
            deepstack.append((k, merger(x, f"{P}deepstack_merger_list.{k}.", True)))
        if progress:
            progress(1)

    g.output(merger(x, P + "merger.", False), "image_embeds", FLOAT, ["merged", cfg.out_hidden_size])
    # Layer order, as transformers appends them: decoder layer j receives the j-th one produced.
    feats = [g.op("Unsqueeze", f, g.const([0])) for _, f in deepstack]
    stacked = g.op("Concat", *feats, axis=0)
    g.output(stacked, "deepstack_features", FLOAT, [len(feats), "merged", cfg.out_hidden_size])
