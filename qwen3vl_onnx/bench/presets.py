"""Released Qwen3-VL shapes (public config.json facts) as bench presets, plus a tiny one for smoke tests.

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


_SHAPES = {
    "2b": Shape(2048, 28, 6144, 16, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "4b": Shape(2560, 36, 9728, 32, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "8b": Shape(4096, 36, 12288, 32, 8, False, 27, 1152, 4304, [8, 16, 24]),
    "32b": Shape(5120, 64, 25600, 64, 8, False, 27, 1152, 4304, [8, 16, 24]),
    "tiny": Shape(64, 2, 128, 4, 2, True, 2, 32, 64, [0, 1]),
}


def preset_config(shape: str) -> dict:
    """A config.json (transformers 4.57 layout, as released) for a named shape."""
    if shape not in _SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(_SHAPES)}")
    hidden, layers, inter, heads, kv, tied, vdepth, vhidden, vinter, ds = _SHAPES[shape]
    tiny = shape == "tiny"
    section = [6, 5, 5] if tiny else [24, 20, 20]
    return make_config(
        tie_word_embeddings=tied,
        text_config={"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
                     "num_key_value_heads": kv, "head_dim": 32 if tiny else 128,
                     "rope_scaling": {"rope_type": "default", "mrope_section": section, "mrope_interleaved": True}},
        vision_config={"depth": vdepth, "hidden_size": vhidden, "intermediate_size": vinter, "num_heads": 2 if tiny else 16,
                       "out_hidden_size": hidden, "deepstack_visual_indexes": ds},
    )  # fmt: skip
