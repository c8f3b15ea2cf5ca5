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

import enum
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .. import graph_io as io
from ..config import TextConfig
from .graph import FLOAT, MS_DOMAIN, Graph
from .moe import Experts, experts_transposed, fused_moe, portable_moe
from .quant import DEFAULT_BLOCK_SIZE

P = "model.language_model."


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


class Kernel(enum.Enum):
    """The matmul a projection becomes."""

    FLOAT = "float"  # MatMul over float weights
    NBITS4 = "nbits4"  # MatMulNBits, 4-bit blocks
    NBITS8 = "nbits8"  # MatMulNBits, 8-bit blocks
    ROWS = "rows"  # int8 per-channel GEMM over per-row int8 activations (``Graph.linear_int8_rows``)


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

    def kernel_for(self, kind: str) -> Kernel:
        """Which matmul a projection kind becomes. lm_head stays MatMulNBits in the prefill graph:
        it runs on the last position only, where a weight-only kernel is the fast one."""
        if self.int8_rows and kind != "lm_head":
            return Kernel.ROWS
        return {0: Kernel.FLOAT, 4: Kernel.NBITS4, 8: Kernel.NBITS8}[self.bits_for(kind)]


def mrope_axis(cfg: TextConfig) -> np.ndarray:
    """Which position axis (0=t, 1=h, 2=w) drives each rotary frequency, interleaved as Qwen3-VL."""
    axis = np.zeros(cfg.head_dim // 2, dtype=np.int64)
    for a in (1, 2):
        axis[a : cfg.mrope_section[a] * 3 : 3] = a
    return axis


class _Decoder:
    """What both attention forms share: projections, norms, MLP, DeepStack, lm_head. The forms
    (``_FusedDecoder``, ``_PortableDecoder``) differ in rotary, attention and the residual norm."""

    def __init__(self, g: Graph, cfg: TextConfig, w: Mapping[str, np.ndarray], opts: DecoderOptions, num_deepstack: int):
        self.g, self.cfg, self.w, self.opts = g, cfg, w, opts
        self.io_in, self.io_out = io.decoder_io(cfg, num_deepstack, opts.fused)
        self.ins = {name: g.input(name, t, shape) for name, (t, shape) in self.io_in.items()}
        self.num_deepstack = num_deepstack
        self.experts_transposed = experts_transposed(w, cfg)

    def proj(self, x: str, w: np.ndarray, name: str, kind: str) -> str:
        o, kernel = self.opts, self.opts.kernel_for(kind)
        if kernel is Kernel.ROWS:
            return self.g.linear_int8_rows(x, w, name)
        if kernel is Kernel.FLOAT:
            return self.g.linear(x, w, None, name)
        return self.g.linear_nbits(x, w, name, o.bits_for(kind), o.block_size, o.accuracy_level)

    def projections(self, x: str, prefix: str, kinds: Sequence[str]) -> list[str]:
        """``x`` projected by each of ``kinds``, one matmul each."""
        return [self.proj(x, self.w[prefix + k + ".weight"], prefix + k, k) for k in kinds]

    def norm(self, x: str, name: str) -> str:
        return self.g.rms_norm(x, self.w[name + ".weight"], name, self.cfg.rms_norm_eps)

    def positions(self) -> str:
        """(B, S, hd/2) interleaved-MRoPE angles: each frequency follows its own position axis."""
        g, cfg = self.g, self.cfg
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
        pos = g.op("Cast", self.ins[io.POSITION_IDS], to=FLOAT)
        pos = g.op("Transpose", g.op("Gather", pos, g.const(mrope_axis(cfg)), axis=0), perm=[1, 2, 0])
        return g.op("Mul", pos, g.const(inv_freq.astype(np.float32), np.float32))

    def qk_v(self, q: str, k: str, v: str, prefix: str) -> tuple[str, str, str]:
        """Biases (where the checkpoint has them) and the per-head RMSNorm of q and k: (B, S, H, hd)."""
        g, cfg, w = self.g, self.cfg, self.w
        if cfg.attention_bias:
            q, k, v = (
                g.op("Add", t, g.weight(prefix + n + "_proj.bias", w[prefix + n + "_proj.bias"], np.float32))
                for t, n in zip((q, k, v), "qkv", strict=True)
            )
        q = self.norm(g.op("Reshape", q, g.const([0, 0, cfg.num_attention_heads, cfg.head_dim])), prefix + "q_norm")
        k = self.norm(g.op("Reshape", k, g.const([0, 0, cfg.num_key_value_heads, cfg.head_dim])), prefix + "k_norm")
        return q, k, v

    def attention(self, h: str, i: int) -> str:
        o, pk, pv = self.attend(h, i)
        g = self.g
        g.output(pk, io.present_key(i), *self.io_out[io.present_key(i)])
        g.output(pv, io.present_value(i), *self.io_out[io.present_value(i)])
        return self.proj(o, self.w[f"{P}layers.{i}.self_attn.o_proj.weight"], f"{P}layers.{i}.self_attn.o_proj", "o_proj")

    def mlp(self, h: str, i: int) -> str:
        g, b = self.g, f"{P}layers.{i}.mlp."
        if self.cfg.is_moe_layer(i):
            return self.moe(h, Experts(self.w, b, self.cfg, self.experts_transposed))
        gate, up = self.gate_up(h, b)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        return self.proj(act, self.w[b + "down_proj.weight"], b + "down_proj", "down_proj")

    def build(self, tied: bool, progress: Callable[[int], object] | None = None) -> None:
        g, cfg = self.g, self.cfg
        self.prepare()
        x = self.ins[io.INPUTS_EMBEDS]
        h = self.norm(x, f"{P}layers.0.input_layernorm")
        for i in range(cfg.num_hidden_layers):
            b = f"{P}layers.{i}."
            h, x = self.skip_norm(self.attention(h, i), x, b + "post_attention_layernorm")
            mlp = self.mlp(h, i)
            nxt = f"{P}layers.{i + 1}.input_layernorm" if i + 1 < cfg.num_hidden_layers else f"{P}norm"
            if i < self.num_deepstack:  # DeepStack: add feature i at the visual rows after layer i
                x = g.op("Add", x, mlp)
                feat = g.op("Gather", self.ins[io.DEEPSTACK_EMBEDS], g.const(i), axis=0)
                x = g.op("ScatterND", x, self.ins[io.VISUAL_INDEX], feat, reduction="add")
                h = self.norm(x, nxt)
            else:
                h, x = self.skip_norm(mlp, x, nxt)
            if progress:
                progress(1)
        keep = g.op("Neg", self.ins[io.LOGITS_TO_KEEP])
        h = g.op("Slice", h, keep, g.const([np.iinfo(np.int64).max]), g.const([1]))
        head = self.w[P + "embed_tokens.weight"] if tied else self.w["lm_head.weight"]
        g.output(self.proj(h, head, "lm_head", "lm_head"), io.LOGITS, *self.io_out[io.LOGITS])

    # The form-specific parts.
    def prepare(self) -> None:
        """Per-graph tensors every layer uses (rotary tables, mask)."""
        raise NotImplementedError

    def attend(self, h: str, i: int) -> tuple[str, str, str]:
        """(attention output (B, S, H*hd), present keys, present values) of layer ``i``."""
        raise NotImplementedError

    def gate_up(self, h: str, prefix: str) -> tuple[str, str]:
        raise NotImplementedError

    def moe(self, h: str, experts: Experts) -> str:
        """A mixture-of-experts layer's MLP (``export.moe``)."""
        raise NotImplementedError

    def skip_norm(self, x: str, residual: str, name: str) -> tuple[str, str]:
        """(RMSNorm(x + residual), x + residual)."""
        raise NotImplementedError


class _FusedDecoder(_Decoder):
    """ONNX Runtime contrib ops: GroupQueryAttention over the shared cache buffer, RotaryEmbedding,
    SkipSimplifiedLayerNormalization, and projections that share an input packed into one matmul."""

    def prepare(self) -> None:
        freqs = self.positions()
        self.cos, self.sin = self.g.op("Cos", freqs), self.g.op("Sin", freqs)

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

    def attend(self, h: str, i: int) -> tuple[str, str, str]:
        g, cfg = self.g, self.cfg
        b = f"{P}layers.{i}.self_attn."
        heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        q, k, v = self.qk_v(*self.packed(h, b, ("q_proj", "k_proj", "v_proj")), b)
        flat = g.const([0, 0, -1])  # (B, S, H*hd): one RotaryEmbedding op each instead of six elementwise ops
        q, k = (
            g.op("RotaryEmbedding", g.op("Reshape", t, flat), self.cos, self.sin, num_heads=n) for t, n in ((q, heads), (k, kvh))
        )
        o, pk, pv = g.op(
            "GroupQueryAttention", q, k, v, self.ins[io.past_key(i)], self.ins[io.past_value(i)],
            self.ins[io.SEQLENS_K], self.ins[io.TOTAL_SEQUENCE_LENGTH],
            domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kvh, scale=cfg.head_dim**-0.5, n_out=3,
        )  # fmt: skip
        return o, pk, pv

    def gate_up(self, h: str, prefix: str) -> tuple[str, str]:
        gate, up = self.packed(h, prefix, ("gate_proj", "up_proj"))
        return gate, up

    def moe(self, h: str, experts: Experts) -> str:
        o = self.opts  # experts take the bits of the dense MLP's projections: gate/up fused, down apart
        bits = (max(o.bits_for("gate_proj"), o.bits_for("up_proj")), o.bits_for("down_proj"))
        return fused_moe(self.g, h, experts, bits, o.block_size, o.accuracy_level)

    def skip_norm(self, x: str, residual: str, name: str) -> tuple[str, str]:
        gamma = self.g.weight(name + ".weight", self.w[name + ".weight"], np.float32)
        out, _, _, total = self.g.op(
            "SkipSimplifiedLayerNormalization", x, residual, gamma, domain=MS_DOMAIN, epsilon=self.cfg.rms_norm_eps, n_out=4
        )
        return out, total


class _PortableDecoder(_Decoder):
    """Standard ONNX ops only, past and new keys concatenated each call: the reference the fused
    form is tested against, and a graph for runtimes without ONNX Runtime's contrib ops."""

    def prepare(self) -> None:
        g = self.g
        freqs = self.positions()  # (B, S, hd/2) -> (B, 1, S, hd) for the rotate-half form
        emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1]))
        self.cos, self.sin = g.op("Cos", emb), g.op("Sin", emb)
        self.mask = self.causal_mask()

    def causal_mask(self) -> str:
        """(S, T) additive mask: query i (absolute past+i) sees keys 0..past+i."""
        g = self.g
        past_len = g.op("Gather", g.op("Shape", self.ins[io.past_key(0)]), g.const(2), axis=0)
        seq_len = g.op("Gather", g.op("Shape", self.ins[io.INPUTS_EMBEDS]), g.const(1), axis=0)
        total = g.op("Add", past_len, seq_len)
        q_pos = g.op("Unsqueeze", g.op("Range", past_len, total, g.const(1)), g.const([1]))
        k_pos = g.op("Unsqueeze", g.op("Range", g.const(0), total, g.const(1)), g.const([0]))
        neg = g.const(np.finfo(np.float32).min, np.float32)
        return g.op("Where", g.op("Greater", k_pos, q_pos), neg, g.const(0.0, np.float32))

    def attend(self, h: str, i: int) -> tuple[str, str, str]:
        g, cfg = self.g, self.cfg
        b = f"{P}layers.{i}.self_attn."
        heads, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = self.qk_v(*self.projections(h, b, ("q_proj", "k_proj", "v_proj")), b)
        v = g.op("Reshape", v, g.const([0, 0, kvh, hd]))
        q, k, v = (g.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, k, v))  # (B, H, S, hd)
        q, k = g.rotary(q, self.cos, self.sin), g.rotary(k, self.cos, self.sin)
        pk, pv = g.op("Concat", self.ins[io.past_key(i)], k, axis=2), g.op("Concat", self.ins[io.past_value(i)], v, axis=2)
        # GQA without copying K/V: group query heads as (B, kvh, groups, S, hd) and broadcast.
        qg = g.op("Reshape", q, g.const([0, kvh, cfg.num_key_value_groups, -1, hd]))
        kt = g.op("Unsqueeze", g.op("Transpose", pk, perm=[0, 1, 3, 2]), g.const([2]))
        scores = g.op("Add", g.op("Mul", g.op("MatMul", qg, kt), g.const(hd**-0.5, np.float32)), self.mask)
        o = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.op("Unsqueeze", pv, g.const([2])))
        o = g.op("Transpose", g.op("Reshape", o, g.const([0, heads, -1, hd])), perm=[0, 2, 1, 3])
        return g.op("Reshape", o, g.const([0, 0, heads * hd])), pk, pv

    def gate_up(self, h: str, prefix: str) -> tuple[str, str]:
        gate, up = self.projections(h, prefix, ("gate_proj", "up_proj"))
        return gate, up

    def moe(self, h: str, experts: Experts) -> str:
        return portable_moe(self.g, h, experts)

    def skip_norm(self, x: str, residual: str, name: str) -> tuple[str, str]:
        total = self.g.op("Add", residual, x)
        return self.norm(total, name), total


def build_decoder(
    g: Graph, cfg: TextConfig, w: Mapping[str, np.ndarray], tied: bool, num_deepstack: int,
    opts: DecoderOptions = DecoderOptions(), progress: Callable[[int], object] | None = None,
) -> None:  # fmt: skip
    """Emit the decoder into ``g``; ``w`` maps HF tensor names to float32 arrays."""
    form = _FusedDecoder if opts.fused else _PortableDecoder
    form(g, cfg, w, opts, num_deepstack).build(tied, progress)
