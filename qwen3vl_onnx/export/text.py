"""The Qwen3-VL text decoder as one ONNX graph with a KV cache and DeepStack injection.

Inputs are embeddings (the host looks tokens up in the stored table and drops image features into
the image-pad rows), 3-D MRoPE position ids (computed on the host as transformers'
``get_rope_index``), and the DeepStack features with the (batch, position) rows they belong to.
Feature k is added to the hidden states after decoder layer k, as ``_deepstack_process`` does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..config import TextConfig
from .graph import FLOAT, INT64, Graph

P = "model.language_model."


def mrope_axis(cfg: TextConfig) -> np.ndarray:
    """Which position axis (0=t, 1=h, 2=w) drives each rotary frequency, interleaved as Qwen3-VL."""
    axis = np.zeros(cfg.head_dim // 2, dtype=np.int64)
    for a in (1, 2):
        axis[a : cfg.mrope_section[a] * 3 : 3] = a
    return axis


def decoder_io(cfg: TextConfig, num_deepstack: int) -> tuple[dict, dict]:
    """Names, element types and symbolic shapes of the decoder's inputs and outputs."""
    kv = ["batch", cfg.num_key_value_heads, "past", cfg.head_dim]
    ins = {
        "inputs_embeds": (FLOAT, ["batch", "seq", cfg.hidden_size]),
        "position_ids": (INT64, [3, "batch", "seq"]),
        "visual_index": (INT64, ["visual", 2]),
        "deepstack_embeds": (FLOAT, [num_deepstack, "visual", cfg.hidden_size]),
        "logits_to_keep": (INT64, [1]),
    }
    outs = {"logits": (FLOAT, ["batch", "keep", cfg.vocab_size])}
    present = ["batch", cfg.num_key_value_heads, "total", cfg.head_dim]
    for i in range(cfg.num_hidden_layers):
        ins[f"past_key.{i}"] = (FLOAT, kv)
        ins[f"past_value.{i}"] = (FLOAT, kv)
        outs[f"present_key.{i}"] = (FLOAT, present)
        outs[f"present_value.{i}"] = (FLOAT, present)
    return ins, outs


def build_decoder(g: Graph, cfg: TextConfig, w: Mapping[str, np.ndarray], tied: bool, num_deepstack: int, progress=None) -> None:
    """Emit the decoder into ``g``; ``w`` maps HF tensor names to float32 arrays."""
    io_in, io_out = decoder_io(cfg, num_deepstack)
    ins = {name: g.input(name, t, shape) for name, (t, shape) in io_in.items()}
    heads, kvh, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    groups = cfg.num_key_value_groups

    # Interleaved MRoPE: pick t/h/w position per frequency, then the usual cos/sin.
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    pos = g.op("Cast", ins["position_ids"], to=FLOAT)
    pos = g.op("Transpose", g.op("Gather", pos, g.const(mrope_axis(cfg)), axis=0), perm=[1, 2, 0])
    freqs = g.op("Mul", pos, g.const(inv_freq.astype(np.float32), np.float32))
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1]))  # (B, 1, S, hd)
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)

    # Causal mask over [past | new]: query i (absolute past+i) may see keys 0..past+i.
    past_len = g.op("Gather", g.op("Shape", ins["past_key.0"]), g.const(2), axis=0)
    seq_len = g.op("Gather", g.op("Shape", ins["inputs_embeds"]), g.const(1), axis=0)
    total = g.op("Add", past_len, seq_len)
    q_pos = g.op("Unsqueeze", g.op("Range", past_len, total, g.const(1)), g.const([1]))
    k_pos = g.op("Unsqueeze", g.op("Range", g.const(0), total, g.const(1)), g.const([0]))
    neg = g.const(np.finfo(np.float32).min, np.float32)
    mask = g.op("Where", g.op("Greater", k_pos, q_pos), neg, g.const(0.0, np.float32))  # (S, T)
    scale = g.const(hd**-0.5, np.float32)

    def attention(h: str, i: int) -> str:
        b = f"{P}layers.{i}.self_attn."
        bias = (lambda n: w[b + n + ".bias"]) if cfg.attention_bias else (lambda n: None)
        q = g.op("Reshape", g.linear(h, w[b + "q_proj.weight"], bias("q_proj"), b + "q_proj"), g.const([0, 0, heads, hd]))
        k = g.op("Reshape", g.linear(h, w[b + "k_proj.weight"], bias("k_proj"), b + "k_proj"), g.const([0, 0, kvh, hd]))
        v = g.op("Reshape", g.linear(h, w[b + "v_proj.weight"], bias("v_proj"), b + "v_proj"), g.const([0, 0, kvh, hd]))
        q = g.op("Transpose", g.rms_norm(q, w[b + "q_norm.weight"], b + "q_norm", eps), perm=[0, 2, 1, 3])
        k = g.op("Transpose", g.rms_norm(k, w[b + "k_norm.weight"], b + "k_norm", eps), perm=[0, 2, 1, 3])
        v = g.op("Transpose", v, perm=[0, 2, 1, 3])
        q, k = g.rotary(q, cos, sin), g.rotary(k, cos, sin)
        k = g.op("Concat", ins[f"past_key.{i}"], k, axis=2)
        v = g.op("Concat", ins[f"past_value.{i}"], v, axis=2)
        g.output(k, f"present_key.{i}", *io_out[f"present_key.{i}"])
        g.output(v, f"present_value.{i}", *io_out[f"present_value.{i}"])
        # GQA without copying K/V: group query heads as (B, kvh, groups, S, hd) and broadcast.
        qg = g.op("Reshape", q, g.const([0, kvh, groups, -1, hd]))
        kt = g.op("Unsqueeze", g.op("Transpose", k, perm=[0, 1, 3, 2]), g.const([2]))
        scores = g.op("Add", g.op("Mul", g.op("MatMul", qg, kt), scale), mask)
        o = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.op("Unsqueeze", v, g.const([2])))
        o = g.op(
            "Reshape",
            g.op("Transpose", g.op("Reshape", o, g.const([0, heads, -1, hd])), perm=[0, 2, 1, 3]),
            g.const([0, 0, heads * hd]),
        )
        return g.linear(o, w[b + "o_proj.weight"], bias("o_proj"), b + "o_proj")

    def mlp(h: str, i: int) -> str:
        b = f"{P}layers.{i}.mlp."
        gate = g.linear(h, w[b + "gate_proj.weight"], None, b + "gate_proj")
        up = g.linear(h, w[b + "up_proj.weight"], None, b + "up_proj")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        return g.linear(act, w[b + "down_proj.weight"], None, b + "down_proj")

    x = ins["inputs_embeds"]
    for i in range(cfg.num_hidden_layers):
        b = f"{P}layers.{i}."
        x = g.op("Add", x, attention(g.rms_norm(x, w[b + "input_layernorm.weight"], b + "input_layernorm", eps), i))
        h = g.rms_norm(x, w[b + "post_attention_layernorm.weight"], b + "post_attention_layernorm", eps)
        x = g.op("Add", x, mlp(h, i))
        if i < num_deepstack:
            feat = g.op("Gather", ins["deepstack_embeds"], g.const(i), axis=0)
            x = g.op("ScatterND", x, ins["visual_index"], feat, reduction="add")
        if progress:
            progress(1)

    x = g.rms_norm(x, w[P + "norm.weight"], P + "norm", eps)
    x = g.op("Slice", x, g.op("Neg", ins["logits_to_keep"]), g.const([np.iinfo(np.int64).max]), g.const([1]))
    head = w[P + "embed_tokens.weight"] if tied else w["lm_head.weight"]
    g.output(g.linear(x, head, None, "lm_head"), "logits", *io_out["logits"])
