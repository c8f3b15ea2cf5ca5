"""The contract between exporter and runtime: names, element types and shapes of every graph input
and output of a bundle. Both sides import these names; neither spells a tensor name itself.

Element types are numpy dtypes (the runtime never imports onnx); the exporter turns them into ONNX
types. Shapes use names for dynamic axes.
"""

from __future__ import annotations

import numpy as np

from .config import TextConfig, VisionConfig

Shape = list[int | str]
Spec = dict[str, tuple[type[np.generic], Shape]]

# Vision tower: patchified pixels and the host-computed geometry in, merged features out.
PIXEL_VALUES = "pixel_values"
POS_INDICES = "pos_indices"
POS_WEIGHTS = "pos_weights"
ROTARY_COS = "rotary_cos"
ROTARY_SIN = "rotary_sin"
BLOCK_LEN = "block_len"
IMAGE_EMBEDS = "image_embeds"
DEEPSTACK_FEATURES = "deepstack_features"

# Decoder.
INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
VISUAL_INDEX = "visual_index"
DEEPSTACK_EMBEDS = "deepstack_embeds"
LOGITS_TO_KEEP = "logits_to_keep"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
LOGITS = "logits"


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def present_key(layer: int) -> str:
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    return f"present_value.{layer}"


def vision_io(cfg: VisionConfig) -> tuple[Spec, Spec]:
    """Inputs and outputs of ``vision.onnx``."""
    ins: Spec = {
        PIXEL_VALUES: (np.float32, ["patches", "patch_dim"]),
        POS_INDICES: (np.int64, ["patches", 4]),
        POS_WEIGHTS: (np.float32, ["patches", 4]),
        ROTARY_COS: (np.float32, ["patches", "head_dim"]),
        ROTARY_SIN: (np.float32, ["patches", "head_dim"]),
        BLOCK_LEN: (np.int64, [1]),  # patches per attention block (one frame); divides ``patches``
    }
    outs: Spec = {
        IMAGE_EMBEDS: (np.float32, ["merged", cfg.out_hidden_size]),
        DEEPSTACK_FEATURES: (np.float32, [len(cfg.deepstack_visual_indexes), "merged", cfg.out_hidden_size]),
    }
    return ins, outs


def decoder_io(cfg: TextConfig, num_deepstack: int, fused: bool) -> tuple[Spec, Spec]:
    """Inputs and outputs of ``decoder.onnx`` (and ``decoder_prefill.onnx``). The fused form binds
    one preallocated buffer per layer as both past and present (``capacity`` positions) and says
    where each row ends with ``seqlens_k``; the portable form concatenates past and new."""
    past = ["batch", cfg.num_key_value_heads, "capacity" if fused else "past", cfg.head_dim]
    present = ["batch", cfg.num_key_value_heads, "capacity" if fused else "total", cfg.head_dim]
    ins: Spec = {
        INPUTS_EMBEDS: (np.float32, ["batch", "seq", cfg.hidden_size]),
        POSITION_IDS: (np.int64, [3, "batch", "seq"]),
        VISUAL_INDEX: (np.int64, ["visual", 2]),  # (batch row, position) of each visual token
        DEEPSTACK_EMBEDS: (np.float32, [num_deepstack, "visual", cfg.hidden_size]),
        LOGITS_TO_KEEP: (np.int64, [1]),
    }
    if fused:
        ins[SEQLENS_K] = (np.int32, ["batch"])  # per row: cached + new tokens - 1
        ins[TOTAL_SEQUENCE_LENGTH] = (np.int32, [])
    outs: Spec = {LOGITS: (np.float32, ["batch", "keep", cfg.vocab_size])}
    for i in range(cfg.num_hidden_layers):
        ins[past_key(i)] = ins[past_value(i)] = (np.float32, past)
        outs[present_key(i)] = outs[present_value(i)] = (np.float32, present)
    return ins, outs
