"""Released Qwen3-VL shapes (public config.json facts) as bench presets, plus a tiny one for smoke tests.

Speed does not depend on weight values, so the bench builds random bf16 checkpoints of these
shapes, streamed to disk one tensor at a time (an 8B model never sits in memory).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..config import Qwen3VLConfig, weight_shapes
from ..demo.checkpoint import CONFIG_HEADER, GENERATION, PREPROCESSOR, VIDEO_PREPROCESSOR, chat_template
from ..demo.tokenizer import write_tokenizer_files
from ..export.weights import f32_to_bf16

# (text hidden, layers, intermediate, heads, kv heads, tied, vision depth, hidden, intermediate, deepstack)
_SHAPES = {
    "2b": (2048, 28, 6144, 16, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "4b": (2560, 36, 9728, 32, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "8b": (4096, 36, 12288, 32, 8, False, 27, 1152, 4304, [8, 16, 24]),
    "32b": (5120, 64, 25600, 64, 8, False, 27, 1152, 4304, [8, 16, 24]),
    "tiny": (64, 2, 128, 4, 2, True, 2, 32, 64, [0, 1]),
}


def preset_config(shape: str) -> dict:
    """A config.json (transformers 4.57 layout, as released) for a named shape."""
    if shape not in _SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(_SHAPES)}")
    hidden, layers, inter, heads, kv, tied, vdepth, vhidden, vinter, ds = _SHAPES[shape]
    head_dim = 128 if shape != "tiny" else 32
    section = [24, 20, 20] if shape != "tiny" else [6, 5, 5]
    return {
        **CONFIG_HEADER,
        "tie_word_embeddings": tied,
        "text_config": {
            "vocab_size": 151936, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "rope_theta": 5000000,
            "rope_scaling": {"rope_type": "default", "mrope_section": section, "mrope_interleaved": True},
            "tie_word_embeddings": tied, "model_type": "qwen3_vl_text",
        },
        "vision_config": {
            "depth": vdepth, "hidden_size": vhidden, "intermediate_size": vinter, "num_heads": 16 if shape != "tiny" else 2,
            "out_hidden_size": hidden, "deepstack_visual_indexes": ds, "hidden_act": "gelu_pytorch_tanh", "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304, "in_channels": 3,
            "model_type": "qwen3_vl",
        },
    }  # fmt: skip


def write_random_checkpoint(directory: Path, config: dict, seed: int = 0, std: float = 0.02) -> Path:
    """bf16 safetensors of the config's shapes, generated and written one tensor at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = weight_shapes(Qwen3VLConfig.from_dict(config))
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(seed)
    tmp = directory / "model.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in shapes.items():
            if "norm" in name and name.endswith("weight"):
                arr = np.ones(shape, np.float32)
            elif name.endswith("bias"):
                arr = np.zeros(shape, np.float32)
            else:
                arr = rng.standard_normal(shape, dtype=np.float32)
                arr *= std
            f.write(f32_to_bf16(arr).tobytes())
            del arr
    tmp.rename(directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer_files(directory, chat_template())
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (directory / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR, indent=1))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION, indent=1))
    return directory
