"""The trained shapes checkpoint: its config, processor settings, and how to unpack it.

The package ships config, fp16 safetensors, chat template and processor/generation configs under
``shapes/checkpoint``; the 16 MB ``tokenizer.json`` is rebuilt from ``qwen.tiktoken`` on unpacking
instead of being shipped twice.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from ..demo.checkpoint import PREPROCESSOR as RELEASED_PREPROCESSOR
from ..demo.checkpoint import make_config
from ..demo.tokenizer import write_tokenizer_files

SHAPES_CONFIG = make_config(
    torch_dtype=None,  # trained in float32 from this config; shipped as fp16 safetensors
    text_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096,
                 "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}},
    vision_config={"depth": 4, "hidden_size": 96, "intermediate_size": 192, "num_heads": 4, "out_hidden_size": 64,
                   "deepstack_visual_indexes": [1, 2]},
)  # fmt: skip
# The name that stands for the packaged checkpoint where a command takes a checkpoint.
PACKAGED_SHAPES = "shapes"
# The released processor settings with a small pixel budget: 9 to 25 image tokens per picture.
PREPROCESSOR = {**RELEASED_PREPROCESSOR, "size": {"shortest_edge": 96 * 96, "longest_edge": 160 * 160}}
GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": False}


def packaged_checkpoint() -> Path:
    return Path(str(resources.files(__package__).joinpath("checkpoint")))


def unpack(directory: Path) -> Path:
    """A complete Hugging Face checkpoint directory (tokenizer.json included) at ``directory``."""
    src = packaged_checkpoint()
    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src}: the trained shapes checkpoint is not in this installation")
    directory.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, directory / f.name)
    template = (src / "chat_template.jinja").read_text()
    write_tokenizer_files(directory, template)
    return directory
