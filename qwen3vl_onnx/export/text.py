"""The Qwen3-VL text decoder as one ONNX graph with a KV cache and DeepStack injection.

Inputs are embeddings (the host looks tokens up in the stored table and drops image features into
the image-pad rows), 3-D MRoPE position ids (computed on the host as transformers'
``get_rope_index``), and the DeepStack features with the (batch, position) rows they belong to.
Feature k is added to the hidden states after decoder layer k, as ``_deepstack_process`` does.

Two attention forms share everything else:
- ``fused`` (default): ONNX Runtime contrib ops. GroupQueryAttention over a preallocated cache
  buffer that is both ``past`` and ``present`` (bound once, written in place, no per-token copy),
  SkipSimplifiedLayerNormalization for residual + RMSNorm, packed QKV and gate/up projections,
  and MatMulNBits when quantized.
- portable: standard ONNX ops only, past/present concatenated each step. Kept as the reference the
  fused form is tested against, and for runtimes without the contrib ops.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import TextConfig
from .graph import FLOAT, INT64, MS_DOMAIN, Graph
from .quant import DEFAULT_BLOCK_SIZE

P = "model.language_model."
INT32 = 6


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# What int4 bundles keep at 8 bits unless told otherwise. Why these two: on the trained shapes
# model the 4-bit lm_head is most of the logit error (its ~10% per-logit error is a floor under
# every other choice); on random checkpoints, quantizing one kind at a time, v_proj costs the most.
# They are ~12% of the 4B decoder's weights: bundle +0.23 GB, decode within noise at 4B and
# -7% at 8B, whose head is untied (README, "Precision and speed", has the table).
DEFAULT_INT8_PROJECTIONS = ("v_proj", "lm_head")


@dataclass(frozen=True)
class DecoderOptions:
    fused: bool = True
    bits: int = 0  # 0: float weights; 4 or 8: MatMulNBits
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = 4  # MatMulNBits: int8 compute where the CPU has it
    int8_projections: tuple[str, ...] = ()  # with bits=4: these PROJECTIONS get 8 bits (checked by the exporter)
    int8_rows: bool = False  # the prefill graph: layer projections as int8 GEMMs over per-row int8 activations

    def bits_for(self, kind: str) -> int:
        """Weight bits of one projection kind (0: float)."""
        return 8 if self.bits == 4 and kind in self.int8_projections else self.bits

    def kernel_for(self, kind: str) -> str:
        """Which matmul a projection kind becomes: "rows" (``Graph.linear_int8_rows``), "nbits4",
        "nbits8" (MatMulNBits) or "float". lm_head stays MatMulNBits in the prefill graph: it runs on
        the last position only, where a weight-only kernel is the fast one."""
        if self.int8_rows and kind != "lm_head":
            return "rows"
        return f"nbits{self.bits_for(kind)}" if self.bits_for(kind) else "float"


def mrope_axis(cfg: TextConfig) -> np.ndarray:
    """Which position axis (0=t, 1=h, 2=w) drives each rotary frequency, interleaved as Qwen3-VL."""
    axis = np.zeros(cfg.head_dim // 2, dtype=np.int64)
    for a in (1, 2):
        axis[a : cfg.mrope_section[a] * 3 : 3] = a
    return axis


def decoder_io(cfg: TextConfig, num_deepstack: int, fused: bool) -> tuple[dict, dict]:
    """Names, element types and symbolic shapes of the decoder's inputs and outputs."""
    past = ["batch", cfg.num_key_value_heads, "capacity" if fused else "past", cfg.head_dim]
    present = ["batch", cfg.num_key_value_heads, "capacity" if fused else "total", cfg.head_dim]
    ins = {
        "inputs_embeds": (FLOAT, ["batch", "seq", cfg.hidden_size]),
        "position_ids": (INT64, [3, "batch", "seq"]),
        "visual_index": (INT64, ["visual", 2]),
        "deepstack_embeds": (FLOAT, [num_deepstack, "visual", cfg.hidden_size]),
        "logits_to_keep": (INT64, [1]),
    }
    if fused:
        ins["seqlens_k"] = (INT32, ["batch"])  # total length - 1 per sequence
        ins["total_sequence_length"] = (INT32, [])
    outs = {"logits": (FLOAT, ["batch", "keep", cfg.vocab_size])}
    for i in range(cfg.num_hidden_layers):
        ins[f"past_key.{i}"] = ins[f"past_value.{i}"] = (FLOAT, past)
        outs[f"present_key.{i}"] = outs[f"present_value.{i}"] = (FLOAT, present)
    return ins, outs


class _Decoder:
    def __init__(self, g: Graph, cfg: TextConfig, w: Mapping[str, np.ndarray], opts: DecoderOptions, num_deepstack: int):
        self.g, self.cfg, self.w, self.opts = g, cfg, w, opts
        self.io_in, self.io_out = decoder_io(cfg, num_deepstack, opts.fused)
        self.ins = {name: g.input(name, t, shape) for name, (t, shape) in self.io_in.items()}
        self.num_deepstack = num_deepstack

    def proj(self, x: str, w: np.ndarray, name: str, kind: str) -> str:
        o, kernel = self.opts, self.opts.kernel_for(kind)
        if kernel == "rows":
            return self.g.linear_int8_rows(x, w, name)
        if kernel.startswith("nbits"):
            return self.g.linear_nbits(x, w, name, o.bits_for(kind), o.block_size, o.accuracy_level)
        return self.g.linear(x, w, None, name)

    def packed(self, x: str, prefix: str, kinds: Sequence[str]) -> list[str]:
        """Project ``x`` by several weights that share it: one matmul per run of kinds with the same
        kernel (q/k/v in one when all are int4, q/k + v when v_proj is kept at 8 bits), split after."""
        outs: list[str] = []
        for _, run in itertools.groupby(kinds, self.opts.kernel_for):
            run = list(run)
            ws = [self.w[prefix + k + ".weight"] for k in run]
            name = prefix + "_".join(k.removesuffix("_proj") for k in run) + "_proj"
            y = self.proj(x, np.concatenate(ws) if len(ws) > 1 else ws[0], name, run[0])
            if len(run) == 1:
                outs.append(y)
            else:
                outs += self.g.op("Split", y, self.g.const([len(w) for w in ws]), axis=-1, n_out=len(run))
        return outs

    def norm(self, x: str, name: str) -> str:
        return self.g.rms_norm(x, self.w[name + ".weight"], name, self.cfg.rms_norm_eps)

    def skip_norm(self, x: str, residual: str, name: str) -> tuple[str, str]:
        """(RMSNorm(x + residual), x + residual) in one fused kernel or two plain ops."""
        g = self.g
        if not self.opts.fused:
            total = g.op("Add", residual, x)
            return self.norm(total, name), total
        gamma = g.weight(name + ".weight", self.w[name + ".weight"], np.float32)
        out, _, _, total = g.op(
            "SkipSimplifiedLayerNormalization", x, residual, gamma, domain=MS_DOMAIN, epsilon=self.cfg.rms_norm_eps, n_out=4
        )
        return out, total

    def rope(self) -> tuple[str, str]:
        """Interleaved-MRoPE cos/sin: (B, S, hd/2) half-width angles for the fused graph's
        RotaryEmbedding op, (B, 1, S, hd) for the portable (B,H,S,hd) rotate-half form."""
        g, cfg = self.g, self.cfg
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
        pos = g.op("Cast", self.ins["position_ids"], to=FLOAT)
        pos = g.op("Transpose", g.op("Gather", pos, g.const(mrope_axis(cfg)), axis=0), perm=[1, 2, 0])
        freqs = g.op("Mul", pos, g.const(inv_freq.astype(np.float32), np.float32))
        if self.opts.fused:
            return g.op("Cos", freqs), g.op("Sin", freqs)
        emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1]))
        return g.op("Cos", emb), g.op("Sin", emb)

    def causal_mask(self) -> str:
        """(S, T) additive mask for the portable form: query i (absolute past+i) sees keys 0..past+i."""
        g = self.g
        past_len = g.op("Gather", g.op("Shape", self.ins["past_key.0"]), g.const(2), axis=0)
        seq_len = g.op("Gather", g.op("Shape", self.ins["inputs_embeds"]), g.const(1), axis=0)
        total = g.op("Add", past_len, seq_len)
        q_pos = g.op("Unsqueeze", g.op("Range", past_len, total, g.const(1)), g.const([1]))
        k_pos = g.op("Unsqueeze", g.op("Range", g.const(0), total, g.const(1)), g.const([0]))
        neg = g.const(np.finfo(np.float32).min, np.float32)
        return g.op("Where", g.op("Greater", k_pos, q_pos), neg, g.const(0.0, np.float32))

    def qkv(self, h: str, i: int, cos: str, sin: str) -> tuple[str, str, str]:
        """Projected, QK-normed, rotated q/k and v: (B, S, heads * hd) for the fused graph (one
        RotaryEmbedding op each instead of six elementwise ops), (B, heads, S, hd) otherwise."""
        g, cfg, w = self.g, self.cfg, self.w
        b = f"{P}layers.{i}.self_attn."
        heads, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if self.opts.fused:  # packed projections, split after
            q, k, v = self.packed(h, b, ("q_proj", "k_proj", "v_proj"))
        else:
            q, k, v = (self.proj(h, w[b + n + "_proj.weight"], b + n + "_proj", n + "_proj") for n in "qkv")
        if cfg.attention_bias:
            q, k, v = (
                g.op("Add", t, g.weight(b + n + "_proj.bias", w[b + n + "_proj.bias"], np.float32))
                for t, n in zip((q, k, v), "qkv", strict=True)
            )
        q = self.norm(g.op("Reshape", q, g.const([0, 0, heads, hd])), b + "q_norm")
        k = self.norm(g.op("Reshape", k, g.const([0, 0, kvh, hd])), b + "k_norm")
        if self.opts.fused:
            flat = g.const([0, 0, -1])
            q, k = (g.op("RotaryEmbedding", g.op("Reshape", t, flat), cos, sin, num_heads=n) for t, n in ((q, heads), (k, kvh)))
            return q, k, v
        v = g.op("Reshape", v, g.const([0, 0, kvh, hd]))
        q, k, v = (g.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, k, v))
        return g.rotary(q, cos, sin), g.rotary(k, cos, sin), v

    def attention(self, h: str, i: int, cos: str, sin: str, mask: str | None) -> str:
        g, cfg = self.g, self.cfg
        heads, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = self.qkv(h, i, cos, sin)
        past_k, past_v = self.ins[f"past_key.{i}"], self.ins[f"past_value.{i}"]
        if self.opts.fused:
            o, pk, pv = g.op(
                "GroupQueryAttention", q, k, v, past_k, past_v,
                self.ins["seqlens_k"], self.ins["total_sequence_length"],
                domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kvh, scale=hd**-0.5, n_out=3,
            )  # fmt: skip
        else:
            pk, pv = g.op("Concat", past_k, k, axis=2), g.op("Concat", past_v, v, axis=2)
            # GQA without copying K/V: group query heads as (B, kvh, groups, S, hd) and broadcast.
            qg = g.op("Reshape", q, g.const([0, kvh, cfg.num_key_value_groups, -1, hd]))
            kt = g.op("Unsqueeze", g.op("Transpose", pk, perm=[0, 1, 3, 2]), g.const([2]))
            scores = g.op("Add", g.op("Mul", g.op("MatMul", qg, kt), g.const(hd**-0.5, np.float32)), mask)
            o = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.op("Unsqueeze", pv, g.const([2])))
            o = g.op("Transpose", g.op("Reshape", o, g.const([0, heads, -1, hd])), perm=[0, 2, 1, 3])
            o = g.op("Reshape", o, g.const([0, 0, heads * hd]))
        g.output(pk, f"present_key.{i}", *self.io_out[f"present_key.{i}"])
        g.output(pv, f"present_value.{i}", *self.io_out[f"present_value.{i}"])
        return self.proj(o, self.w[f"{P}layers.{i}.self_attn.o_proj.weight"], f"{P}layers.{i}.self_attn.o_proj", "o_proj")

    def mlp(self, h: str, i: int) -> str:
        g, w, b = self.g, self.w, f"{P}layers.{i}.mlp."
        if self.opts.fused:
            gate, up = self.packed(h, b, ("gate_proj", "up_proj"))
        else:
            gate, up = (self.proj(h, w[b + k + ".weight"], b + k, k) for k in ("gate_proj", "up_proj"))
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        return self.proj(act, w[b + "down_proj.weight"], b + "down_proj", "down_proj")

    def build(self, tied: bool, progress=None) -> None:
        g, cfg = self.g, self.cfg
        cos, sin = self.rope()
        mask = None if self.opts.fused else self.causal_mask()
        x = self.ins["inputs_embeds"]
        h = self.norm(x, f"{P}layers.0.input_layernorm")
        for i in range(cfg.num_hidden_layers):
            b = f"{P}layers.{i}."
            h, x = self.skip_norm(self.attention(h, i, cos, sin, mask), x, b + "post_attention_layernorm")
            mlp = self.mlp(h, i)
            nxt = f"{P}layers.{i + 1}.input_layernorm" if i + 1 < cfg.num_hidden_layers else f"{P}norm"
            if i < self.num_deepstack:  # DeepStack: add feature i at the visual rows after layer i
                x = g.op("Add", x, mlp)
                feat = g.op("Gather", self.ins["deepstack_embeds"], g.const(i), axis=0)
                x = g.op("ScatterND", x, self.ins["visual_index"], feat, reduction="add")
                h = self.norm(x, nxt)
            else:
                h, x = self.skip_norm(mlp, x, nxt)
            if progress:
                progress(1)
        h = g.op("Slice", h, g.op("Neg", self.ins["logits_to_keep"]), g.const([np.iinfo(np.int64).max]), g.const([1]))
        head = self.w[P + "embed_tokens.weight"] if tied else self.w["lm_head.weight"]
        g.output(self.proj(h, head, "lm_head", "lm_head"), "logits", *self.io_out["logits"])


def build_decoder(
    g: Graph, cfg: TextConfig, w: Mapping[str, np.ndarray], tied: bool, num_deepstack: int,
    opts: DecoderOptions = DecoderOptions(), progress=None,
) -> None:  # fmt: skip
    """Emit the decoder into ``g``; ``w`` maps HF tensor names to float32 arrays."""
    _Decoder(g, cfg, w, opts, num_deepstack).build(tied, progress)
