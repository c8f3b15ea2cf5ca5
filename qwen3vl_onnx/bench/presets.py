"""Released Qwen3-VL shapes (public config.json facts) as bench presets, plus tiny ones for smoke tests.

Speed does not depend on weight values, so the bench builds random bf16 checkpoints of these
shapes with ``demo.checkpoint.write_checkpoint``, streamed to disk one tensor at a time (an 8B
model never sits in memory).
"""

from __future__ import annotations

from typing import NamedTuple

from ..demo.checkpoint import make_config


class Shape(NamedTuple):
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    deepstack: list[int]
    moe: tuple[int, int, int] | None = None  # (num_experts, num_experts_per_tok, moe_intermediate_size)


_SHAPES = {
    "2b": Shape(2048, 28, 6144, 16, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "4b": Shape(2560, 36, 9728, 32, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "8b": Shape(4096, 36, 12288, 32, 8, False, 27, 1152, 4304, [8, 16, 24]),
    "32b": Shape(5120, 64, 25600, 64, 8, False, 27, 1152, 4304, [8, 16, 24]),
    "30b-a3b": Shape(2048, 48, 6144, 32, 4, False, 27, 1152, 4304, [8, 16, 24], moe=(128, 8, 768)),
    # not a released Qwen3-VL: the 0.6B-class text shape (Qwen3-0.6B's widths at 16 layers, tied) that the
    # small-model decode and bundle-size comparisons use, with the smallest released vision tower (2B's)
    "0.6b": Shape(1024, 16, 3072, 16, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "tiny": Shape(64, 2, 128, 4, 2, True, 2, 32, 64, [0, 1]),
    "tiny-moe": Shape(64, 2, 128, 4, 2, True, 2, 32, 64, [0, 1], moe=(4, 2, 32)),
}
SHAPES = tuple(_SHAPES)


def preset_config(shape: str, layers: int | None = None) -> dict:
    """A config.json (transformers 4.57 layout, as released) for a named shape; ``layers``: keep the
    real widths but only that many decoder layers (a full random 30B-A3B is ~62 GB of bf16)."""
    if shape not in _SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(_SHAPES)}")
    hidden, full, inter, heads, kv, tied, vdepth, vhidden, vinter, ds, moe = _SHAPES[shape]
    tiny = shape.startswith("tiny")
    section = [6, 5, 5] if tiny else [24, 20, 20]
    text = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers or full, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": 32 if tiny else 128,
            "rope_scaling": {"rope_type": "default", "mrope_section": section, "mrope_interleaved": True}}  # fmt: skip
    top: dict = {}
    if moe:
        text.update(model_type="qwen3_vl_moe_text", num_experts=moe[0], num_experts_per_tok=moe[1], moe_intermediate_size=moe[2],
                    decoder_sparse_step=1, mlp_only_layers=[])  # fmt: skip
        top = {"architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe"}
    return make_config(
        **top,
        tie_word_embeddings=tied,
        text_config=text,
        vision_config={"depth": vdepth, "hidden_size": vhidden, "intermediate_size": vinter, "num_heads": 2 if tiny else 16,
                       "out_hidden_size": hidden, "deepstack_visual_indexes": ds},
    )  # fmt: skip


def full_layers(shape: str) -> int:
    """The preset's decoder depth (the released one for released shapes)."""
    return _SHAPES[shape].layers
