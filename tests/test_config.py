"""Config parsing: both transformers layouts, the released shapes, and clear rejections."""

from __future__ import annotations

import copy
import json

import pytest

from qwen3vl_onnx.config import Qwen3VLConfig, weight_shapes
from qwen3vl_onnx.demo.checkpoint import DEMO_CONFIG
from qwen3vl_onnx.errors import UserError

from .conftest import GEOMETRIES, MOE_GEOMETRIES, hf_config


def test_layout_457_and_5x_agree():
    old = DEMO_CONFIG  # rope_scaling + rope_theta (4.57)
    new = copy.deepcopy(DEMO_CONFIG)
    t = new["text_config"]
    t["rope_parameters"] = {**t.pop("rope_scaling"), "rope_theta": t.pop("rope_theta")}
    a, b = Qwen3VLConfig.from_dict(old), Qwen3VLConfig.from_dict(new)
    assert a.to_dict() == b.to_dict()
    assert a.text.rope_theta == 5e6 and a.text.mrope_section == (6, 5, 5) and a.tie_word_embeddings


def test_manifest_roundtrip():
    cfg = Qwen3VLConfig.from_dict(hf_config(GEOMETRIES["untied_gqa4"]))
    assert Qwen3VLConfig.from_manifest(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_weight_names_match_transformers(tiny_one):
    cfg = Qwen3VLConfig.from_file(tiny_one.checkpoint / "config.json")
    sd = {k: tuple(v.shape) for k, v in tiny_one.model.state_dict().items() if k != "lm_head.weight"}
    assert weight_shapes(cfg) == sd


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(architectures=["LlamaForCausalLM"], model_type="llama"), "not Qwen3VLForConditionalGeneration"),
        (lambda d: d.pop("vision_config"), "vision_config"),
        (lambda d: d["text_config"].pop("hidden_size"), "hidden_size"),
        (lambda d: d["text_config"]["rope_scaling"].update(mrope_section=[1, 2, 3]), "mrope_section"),
    ],
)
def test_rejections(mutate, message):
    d = copy.deepcopy(DEMO_CONFIG)
    mutate(d)
    with pytest.raises(UserError, match=message):
        Qwen3VLConfig.from_dict(d)


def test_moe_keys_in_both_spellings():
    """Released configs say ``num_experts``; transformers 5 saves ``num_local_experts``."""
    released = hf_config(MOE_GEOMETRIES["moe_untied_top4of8_step2"])
    saved = copy.deepcopy(released)
    saved["text_config"]["num_local_experts"] = saved["text_config"].pop("num_experts")
    a, b = Qwen3VLConfig.from_dict(released), Qwen3VLConfig.from_dict(saved)
    assert a == b and a.text.num_experts == 8 and a.text.num_experts_per_tok == 4
    assert a.text.moe_layers == (1, 3) and a.architecture == "Qwen3VLMoeForConditionalGeneration"
    assert Qwen3VLConfig.from_manifest(json.loads(json.dumps(a.to_dict()))) == a
    tied = Qwen3VLConfig.from_dict(hf_config(MOE_GEOMETRIES["moe_tied_top2of4"]))
    assert tied.text.moe_layers == (0, 2) and tied.text.mlp_only_layers == (1,)


def test_moe_weight_names_match_transformers(tiny_models):
    """Names and shapes against the transformers model: its modules hold experts as torch linear
    weights, the layout transformers 5 saves (``experts_transposed``)."""
    tiny = tiny_models("moe_tied_top2of4")
    cfg = Qwen3VLConfig.from_file(tiny.checkpoint / "config.json")
    sd = {k: tuple(v.shape) for k, v in tiny.model.state_dict().items() if k != "lm_head.weight"}
    assert weight_shapes(cfg, experts_transposed=True) == sd
    released = weight_shapes(cfg)
    assert released["model.language_model.layers.0.mlp.experts.gate_up_proj"] == (4, 64, 96)
    assert released["model.language_model.layers.0.mlp.experts.down_proj"] == (4, 48, 64)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda t: t.update(num_experts_per_tok=9), "num_experts_per_tok 9 must be between 1 and num_experts 8"),
        (lambda t: t.update(moe_intermediate_size=0), "moe_intermediate_size"),
        (lambda t: t.update(decoder_sparse_step=0), "decoder_sparse_step"),
        (lambda t: t.update(norm_topk_prob=False), "norm_topk_prob"),
        (lambda t: t.pop("moe_intermediate_size"), "moe_intermediate_size"),
    ],
)
def test_moe_rejections(mutate, message):
    d = hf_config(MOE_GEOMETRIES["moe_untied_top4of8_step2"])
    mutate(d["text_config"])
    with pytest.raises(UserError, match=message):
        Qwen3VLConfig.from_dict(d)
