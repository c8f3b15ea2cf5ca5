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

from collections.abc import Mapping

import numpy as np

from ..config import VisionConfig
from .graph import FLOAT, INT64, MS_DOMAIN, Graph

P = "model.visual."

VISION_INPUTS = {
    "pixel_values": (FLOAT, ["patches", "patch_dim"]),
    "pos_indices": (INT64, ["patches", 4]),
    "pos_weights": (FLOAT, ["patches", 4]),
    "rotary_cos": (FLOAT, ["patches", "head_dim"]),
    "rotary_sin": (FLOAT, ["patches", "head_dim"]),
    "block_len": (INT64, [1]),  # patches per attention block (one frame); divides ``patches``
}


def build_vision(
    g: Graph, cfg: VisionConfig, w: Mapping[str, np.ndarray], progress=None, int8: bool = False, fused: bool = True
) -> None:
    """Emit the vision tower into ``g``; ``w`` maps HF tensor names to float32 arrays.

    ``int8`` runs the tower's linear layers through DynamicQuantizeMatMul (int8 per-channel weights,
    activations quantized per call). ``fused`` attends with MultiHeadAttention; otherwise with
    standard MatMul/Softmax ops (the portable reference).
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

    blocks = g.op("Concat", g.const([-1]), ins["block_len"], g.const([d]), axis=0)  # (B, L, d)
    if fused:  # RotaryEmbedding takes the half-width angles per token: (N, hd) -> (B, L, hd / 2)
        halves = g.op("Concat", g.const([-1]), ins["block_len"], g.const([hd // 2]), axis=0)
        cos, sin = (g.op("Reshape", g.op("Slice", ins[n], g.const([0]), g.const([hd // 2]), g.const([1])), halves)
                    for n in ("rotary_cos", "rotary_sin"))  # fmt: skip
    else:
        cos = g.op("Unsqueeze", ins["rotary_cos"], g.const([1]))  # (N, 1, hd)
        sin = g.op("Unsqueeze", ins["rotary_sin"], g.const([1]))

    def attention(h: str, prefix: str) -> str:
        qkv = lin(h, prefix + "qkv")
        if fused:  # (N, 3d) -> 3 x (B, L, d), rotated there by one fused op each
            q, k, v = (g.op("Reshape", t, blocks) for t in g.op("Split", qkv, axis=-1, num_outputs=3, n_out=3))
            q, k = (g.op("RotaryEmbedding", t, cos, sin, num_heads=heads) for t in (q, k))
            o = g.op("MultiHeadAttention", q, k, v, domain=MS_DOMAIN, num_heads=heads, scale=hd**-0.5)
        else:  # (N, 3, H, hd) -> 3 x (N, H, hd) -> (B, L, H*hd) -> (B, H, L, hd)
            qkv = g.op("Reshape", qkv, g.const([0, 3, heads, hd]))
            q, k, v = (g.op("Squeeze", t, g.const([1])) for t in g.op("Split", qkv, axis=1, num_outputs=3, n_out=3))
            q, k = g.rotary(q, cos, sin), g.rotary(k, cos, sin)
            q, k, v = (g.op("Reshape", t, blocks) for t in (q, k, v))
            q, k, v = (g.op("Transpose", g.op("Reshape", t, g.const([0, 0, heads, hd])), perm=[0, 2, 1, 3]) for t in (q, k, v))
            scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(hd**-0.5, np.float32))
            o = g.op("Transpose", g.op("MatMul", g.op("Softmax", scores, axis=-1), v), perm=[0, 2, 1, 3])
        return lin(g.op("Reshape", o, g.const([-1, d])), prefix + "proj")

    def merger(h: str, prefix: str, postshuffle: bool) -> str:
        norm = lambda t: g.layer_norm(t, w[prefix + "norm.weight"], w[prefix + "norm.bias"], prefix + "norm")  # noqa: E731
        h = (
            norm(g.op("Reshape", h, g.const([-1, cfg.merged_hidden_size])))
            if postshuffle
            else g.op("Reshape", norm(h), g.const([-1, cfg.merged_hidden_size]))
        )
        return lin(g.gelu(lin(h, prefix + "linear_fc1"), "none"), prefix + "linear_fc2")

    act = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def gelu(t: str, approximate: str) -> str:
        """FastGelu is ONNX Runtime's vectorised kernel for exactly the tanh form."""
        return g.op("FastGelu", t, domain=MS_DOMAIN) if fused and approximate == "tanh" else g.gelu(t, approximate)

    deepstack = []
    for i in range(cfg.depth):
        # Residual add + LayerNormalization, not SkipLayerNormalization: ORT 1.32's CPU kernel took
        # 92 ms over the 4B tower at 448x448 against 27 ms for the two ops (profiled).
        b = f"{P}blocks.{i}."
        h = g.layer_norm(x, w[b + "norm1.weight"], w[b + "norm1.bias"], b + "norm1")
        x = g.op("Add", x, attention(h, b + "attn."))
        h = g.layer_norm(x, w[b + "norm2.weight"], w[b + "norm2.bias"], b + "norm2")
        h = lin(gelu(lin(h, b + "mlp.linear_fc1"), act), b + "mlp.linear_fc2")
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
