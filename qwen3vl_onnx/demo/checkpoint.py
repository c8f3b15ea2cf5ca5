"""A small random-weight Qwen3-VL checkpoint of the real architecture, built without PyTorch.

No weights can be downloaded here, so the demo makes its own: the released layout (config.json in
the transformers 4.57 form, bf16 safetensors, the real Qwen tokenizer, a Qwen3-VL chat template and
processor configs) with random values. Its answers are meaningless; everything else is real.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RELEASED_IMAGE_PROCESSOR, Qwen3VLConfig, weight_shapes
from ..export.weights import write_safetensors
from .tokenizer import write_tokenizer_files

# Qwen3-VL-2B-Instruct's config.json (public facts, transformers 4.57 layout): the base that every
# config made here overrides, so demo, shapes, bench presets and tests share one source.
RELEASED_2B = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "qwen3_vl_text",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "rope_theta": 5000000,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vision_config": {
        "model_type": "qwen3_vl",
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "deepstack_visual_indexes": [5, 11, 17],
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "initializer_range": 0.02,
    },
}


def make_config(**overrides: Any) -> dict[str, Any]:
    """A config.json dict: ``RELEASED_2B`` with ``overrides`` (HF keys) merged in; ``text_config``
    and ``vision_config`` overrides merge key by key, an override of None removes the key, and a
    top-level ``tie_word_embeddings`` is mirrored into the text config, as released configs carry
    it in both."""
    cfg = copy.deepcopy(RELEASED_2B)

    def merge(into: dict[str, Any], items: dict[str, Any]) -> None:
        for key, value in items.items():
            if value is None:
                into.pop(key, None)
            elif key in ("text_config", "vision_config"):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(cfg, overrides)
    if "tie_word_embeddings" in overrides and "tie_word_embeddings" not in overrides.get("text_config", {}):
        cfg["text_config"]["tie_word_embeddings"] = overrides["tie_word_embeddings"]
    return cfg


# The demo's random model: the real vocabulary and layout at a width that exports in seconds.
DEMO_CONFIG = make_config(
    text_config={"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 32,
                 "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}},
    vision_config={"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 128,
                   "deepstack_visual_indexes": [1, 2]},
)  # fmt: skip
PREPROCESSOR = RELEASED_IMAGE_PROCESSOR
VIDEO_PREPROCESSOR = {
    **PREPROCESSOR,
    "size": {"shortest_edge": 4096, "longest_edge": 25165824},
    "fps": 2,
    "video_processor_type": "Qwen3VLVideoProcessor",
}
GENERATION = {
    "bos_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


def chat_template() -> str:
    return resources.files(__package__).joinpath("chat_template.jinja").read_text()


def sample_image_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("sample.png")))


def random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator, std: float) -> np.ndarray:
    """Norm weights at one, biases at zero, everything else N(0, std)."""
    if "norm" in name and name.endswith("weight"):
        return np.ones(shape, np.float32)
    if name.endswith("bias"):
        return np.zeros(shape, np.float32)
    arr = rng.standard_normal(shape, dtype=np.float32)
    arr *= std
    return arr


def write_checkpoint(directory: Path, config: dict | None = None, seed: int = 0, std: float = 0.02) -> Path:
    """A complete Hugging Face-layout checkpoint with random bf16 weights (``DEMO_CONFIG`` by
    default), streamed to disk one tensor at a time so any released shape fits in memory."""
    config = config or DEMO_CONFIG
    directory.mkdir(parents=True, exist_ok=True)
    shapes = weight_shapes(Qwen3VLConfig.from_dict(config))
    rng = np.random.default_rng(seed)
    entries = {name: (tuple(shape), "BF16") for name, shape in shapes.items()}
    write_safetensors(directory / "model.safetensors", entries, lambda name: random_tensor(name, shapes[name], rng, std))
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer_files(directory, chat_template())
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (directory / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR, indent=1))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION, indent=1))
    return directory
