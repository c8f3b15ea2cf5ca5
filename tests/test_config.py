"""Config parsing: both transformers layouts, the released shapes, and clear rejections."""

from __future__ import annotations

import copy
import json

import pytest

from qwen3vl_onnx.config import Qwen3VLConfig, weight_shapes
from qwen3vl_onnx.demo.checkpoint import DEMO_CONFIG
from qwen3vl_onnx.errors import UserError

from .conftest import GEOMETRIES, hf_config


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
