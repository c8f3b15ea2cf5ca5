"""The single source of model geometry: a dataclass parsed from a checkpoint's ``config.json``.

Field names are the Hugging Face keys so that a reader can hold this file next to a real
``config.json``. Both the transformers 4.57 layout (``rope_scaling`` + ``rope_theta``) and the 5.x
layout (``rope_parameters``) are accepted; anything that is not Qwen3-VL is rejected here, before
any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

ARCHITECTURE = "Qwen3VLForConditionalGeneration"
MOE_ARCHITECTURE = "Qwen3VLMoeForConditionalGeneration"
MODEL_TYPES = {"qwen3_vl": ARCHITECTURE, "qwen3_vl_moe": MOE_ARCHITECTURE}
# Bundle layout version, written by the exporter and checked by the runtime. 2: the vision graph
# takes ``block_len`` (one frame size per call) instead of padded gather/mask/scatter blocks.
BUNDLE_FORMAT_VERSION = 3


# The image processor settings Qwen3-VL was released with (its preprocessor_config.json): what a
# bundle gets when a checkpoint ships none, and the runtime's ImageProcessorConfig defaults.
RELEASED_IMAGE_PROCESSOR: dict[str, Any] = {
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_resize": True,
    "do_convert_rgb": True,
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
}


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    num_position_embeddings: int = 2304
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_grid_per_side(self) -> int:
        return int(self.num_position_embeddings**0.5)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merged_hidden_size(self) -> int:
        return self.hidden_size * self.spatial_merge_size**2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    mrope_section: tuple[int, int, int]
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    attention_bias: bool = False
    mrope_interleaved: bool = True
    # Mixture of experts (Qwen3-VL-MoE); num_experts 0: every layer is a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` routes to experts, by transformers' rule for Qwen3-VL-MoE."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))


@dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> Qwen3VLConfig:
        """Parse and validate a Hugging Face Qwen3-VL config dict (4.57 or 5.x layout)."""
        archs = d.get("architectures") or []
        if d.get("model_type") not in MODEL_TYPES and not set(archs) & set(MODEL_TYPES.values()):
            found = ", ".join(archs) or d.get("model_type") or "unknown"
            raise UserError(f"{source}: model is {found}, not {ARCHITECTURE} or {MOE_ARCHITECTURE} (only Qwen3-VL is supported)")
        t, v = d.get("text_config"), d.get("vision_config")
        if not isinstance(t, dict) or not isinstance(v, dict):
            raise UserError(f"{source}: text_config and vision_config are required for {ARCHITECTURE}")
        try:
            text = _parse_text(t)
            vision = _parse_vision(v)
        except KeyError as e:
            raise UserError(f"{source}: missing key {e.args[0]!r}") from None
        tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        cfg = cls(
            text=text,
            vision=vision,
            tie_word_embeddings=bool(tie),
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            raw=d,
        )
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen3VLConfig:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))

    def validate(self, source: str = "config.json") -> None:
        t, v = self.text, self.vision
        problems = []
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if sum(t.mrope_section) != t.head_dim // 2:
            problems.append(f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            problems.append("vision head_dim must be a multiple of 4 (2-D rotary)")
        if v.num_grid_per_side**2 != v.num_position_embeddings:
            problems.append("vision num_position_embeddings must be a square")
        if any(i < 0 or i >= v.depth for i in v.deepstack_visual_indexes):
            problems.append("deepstack_visual_indexes must index vision blocks")
        if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
            problems.append("more deepstack features than decoder layers")
        if v.out_hidden_size != t.hidden_size:
            problems.append("vision out_hidden_size must equal text hidden_size")
        if not t.mrope_interleaved:
            problems.append("only interleaved MRoPE (Qwen3-VL) is supported")
        if t.num_experts:
            problems += _moe_problems(t)
        if problems:
            raise UserError(f"{source}: " + "; ".join(problems))

    @property
    def architecture(self) -> str:
        return MOE_ARCHITECTURE if self.text.num_experts else ARCHITECTURE

    def to_dict(self) -> dict[str, Any]:
        """A compact, JSON-able form stored in the bundle manifest."""
        d = dataclasses.asdict(self)
        d.pop("raw")
        return d

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> Qwen3VLConfig:
        text = dict(d["text"])
        text["mrope_section"] = tuple(text["mrope_section"])
        text["mlp_only_layers"] = tuple(text.get("mlp_only_layers", ()))
        vision = dict(d["vision"])
        vision["deepstack_visual_indexes"] = tuple(vision["deepstack_visual_indexes"])
        rest = {k: v for k, v in d.items() if k not in ("text", "vision")}
        return cls(text=TextConfig(**text), vision=VisionConfig(**vision), **rest)


def _moe_problems(t: TextConfig) -> list[str]:
    """What makes a mixture-of-experts text config unusable (each a clause of the one-line error)."""
    problems = []
    if t.num_experts < 0 or not 0 < t.num_experts_per_tok <= t.num_experts:
        problems.append(f"num_experts_per_tok {t.num_experts_per_tok} must be between 1 and num_experts {t.num_experts}")
    if t.moe_intermediate_size <= 0:
        problems.append("moe_intermediate_size must be positive")
    if t.decoder_sparse_step < 1:
        problems.append("decoder_sparse_step must be at least 1")
    if any(not 0 <= i < t.num_hidden_layers for i in t.mlp_only_layers):
        problems.append("mlp_only_layers must index decoder layers")
    return problems


def _rope(t: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Return (theta, rope dict) from either ``rope_parameters`` (5.x) or ``rope_scaling`` (4.57)."""
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", 5_000_000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise UserError(f"config.json: rope type {kind!r} is not supported (Qwen3-VL uses default MRoPE)")
    return float(theta), rope


def _parse_text(t: dict[str, Any]) -> TextConfig:
    theta, rope = _rope(t)
    heads = int(t["num_attention_heads"])
    hidden = int(t["hidden_size"])
    head_dim = int(t.get("head_dim") or hidden // heads)
    return TextConfig(
        vocab_size=int(t["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(t["intermediate_size"]),
        num_hidden_layers=int(t["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(t.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rope_theta=theta,
        mrope_section=tuple(int(x) for x in rope.get("mrope_section", (24, 20, 20))),  # type: ignore[arg-type]
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(t.get("max_position_embeddings", 262144)),
        hidden_act=t.get("hidden_act", "silu"),
        attention_bias=bool(t.get("attention_bias", False)),
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
        **_parse_moe(t),
    )


def _parse_moe(t: dict[str, Any]) -> dict[str, Any]:
    """The MoE keys of a text config; transformers 5.x writes ``num_local_experts`` for ``num_experts``."""
    experts = int(t.get("num_experts", t.get("num_local_experts")) or 0)
    if not experts:
        return {}
    if t.get("norm_topk_prob") is False:
        raise UserError("config.json: norm_topk_prob false is not supported (Qwen3-VL-MoE renormalises the top-k weights)")
    if t.get("shared_expert_intermediate_size"):
        raise UserError("config.json: shared experts are not supported (Qwen3-VL-MoE has none)")
    return {
        "num_experts": experts,
        "num_experts_per_tok": int(t["num_experts_per_tok"]),
        "moe_intermediate_size": int(t["moe_intermediate_size"]),
        "decoder_sparse_step": int(t.get("decoder_sparse_step", 1)),
        "mlp_only_layers": tuple(int(i) for i in t.get("mlp_only_layers") or ()),
    }


def _parse_vision(v: dict[str, Any]) -> VisionConfig:
    rope = v.get("rope_parameters") or {}
    return VisionConfig(
        depth=int(v["depth"]),
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_heads=int(v["num_heads"]),
        out_hidden_size=int(v["out_hidden_size"]),
        deepstack_visual_indexes=tuple(int(i) for i in v.get("deepstack_visual_indexes", (8, 16, 24))),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        in_channels=int(v.get("in_channels", 3)),
        patch_size=int(v.get("patch_size", 16)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        num_position_embeddings=int(v.get("num_position_embeddings", 2304)),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


def weight_shapes(cfg: Qwen3VLConfig, experts_transposed: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen3-VL checkpoint holds, with its shape (HF names).

    The loader asserts a checkpoint against this table and the demo builds random weights from it,
    so a naming mistake shows up as a one-line error instead of a silently zero weight. MoE experts
    are fused per layer, in the released layout (gate_up (E, hidden, 2 * moe_inter), gate first;
    down (E, moe_inter, hidden)); ``experts_transposed``: the layout transformers 5 saves, each
    expert a torch linear weight (E, 2 * moe_inter, hidden) and (E, hidden, moe_inter).
    """
    t, v = cfg.text, cfg.vision
    s: dict[str, tuple[int, ...]] = {}
    vp = "model.visual."
    s[vp + "patch_embed.proj.weight"] = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    s[vp + "patch_embed.proj.bias"] = (v.hidden_size,)
    s[vp + "pos_embed.weight"] = (v.num_position_embeddings, v.hidden_size)
    for i in range(v.depth):
        b = f"{vp}blocks.{i}."
        for n in ("norm1", "norm2"):
            s[b + n + ".weight"] = s[b + n + ".bias"] = (v.hidden_size,)
        s[b + "attn.qkv.weight"] = (3 * v.hidden_size, v.hidden_size)
        s[b + "attn.qkv.bias"] = (3 * v.hidden_size,)
        s[b + "attn.proj.weight"] = (v.hidden_size, v.hidden_size)
        s[b + "attn.proj.bias"] = (v.hidden_size,)
        s[b + "mlp.linear_fc1.weight"] = (v.intermediate_size, v.hidden_size)
        s[b + "mlp.linear_fc1.bias"] = (v.intermediate_size,)
        s[b + "mlp.linear_fc2.weight"] = (v.hidden_size, v.intermediate_size)
        s[b + "mlp.linear_fc2.bias"] = (v.hidden_size,)
    mergers = ["merger."] + [f"deepstack_merger_list.{k}." for k in range(len(v.deepstack_visual_indexes))]
    for m in mergers:
        norm = v.hidden_size if m == "merger." else v.merged_hidden_size
        s[vp + m + "norm.weight"] = s[vp + m + "norm.bias"] = (norm,)
        s[vp + m + "linear_fc1.weight"] = (v.merged_hidden_size, v.merged_hidden_size)
        s[vp + m + "linear_fc1.bias"] = (v.merged_hidden_size,)
        s[vp + m + "linear_fc2.weight"] = (v.out_hidden_size, v.merged_hidden_size)
        s[vp + m + "linear_fc2.bias"] = (v.out_hidden_size,)
    lp = "model.language_model."
    s[lp + "embed_tokens.weight"] = (t.vocab_size, t.hidden_size)
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    for i in range(t.num_hidden_layers):
        b = f"{lp}layers.{i}."
        s[b + "input_layernorm.weight"] = s[b + "post_attention_layernorm.weight"] = (t.hidden_size,)
        s[b + "self_attn.q_proj.weight"] = (q, t.hidden_size)
        s[b + "self_attn.k_proj.weight"] = (kv, t.hidden_size)
        s[b + "self_attn.v_proj.weight"] = (kv, t.hidden_size)
        s[b + "self_attn.o_proj.weight"] = (t.hidden_size, q)
        if t.attention_bias:
            s[b + "self_attn.q_proj.bias"] = (q,)
            s[b + "self_attn.k_proj.bias"] = s[b + "self_attn.v_proj.bias"] = (kv,)
            s[b + "self_attn.o_proj.bias"] = (t.hidden_size,)
        s[b + "self_attn.q_norm.weight"] = s[b + "self_attn.k_norm.weight"] = (t.head_dim,)
        if t.is_moe_layer(i):
            e, h, m = t.num_experts, t.hidden_size, t.moe_intermediate_size
            s[b + "mlp.gate.weight"] = (e, h)
            s[b + "mlp.experts.gate_up_proj"] = (e, 2 * m, h) if experts_transposed else (e, h, 2 * m)
            s[b + "mlp.experts.down_proj"] = (e, h, m) if experts_transposed else (e, m, h)
        else:
            s[b + "mlp.gate_proj.weight"] = s[b + "mlp.up_proj.weight"] = (t.intermediate_size, t.hidden_size)
            s[b + "mlp.down_proj.weight"] = (t.hidden_size, t.intermediate_size)
    s[lp + "norm.weight"] = (t.hidden_size,)
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (t.vocab_size, t.hidden_size)
    return s
