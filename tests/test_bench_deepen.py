"""bench/deepen.py: a bundle deepened by repeating its layers computes what transformers computes
with the same layers repeated, so the speed and memory it measures are those of a deeper model."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from qwen3vl_onnx.bench.deepen import deepen
from qwen3vl_onnx.calibration import Calibrator
from qwen3vl_onnx.errors import UserError
from qwen3vl_onnx.export.bundle import export
from qwen3vl_onnx.export.options import ExportOptions

from .conftest import build_checkpoint
from .test_parity import assert_prefill_logits

# One DeepStack layer then three plain ones: the repeats start at layer 2, the first that takes the
# residual stream as the final norm does (two tensors into the fused skip norm).
MOE_4 = dict(tie=False, heads=4, kv=2, layers=4, depth=2, deepstack=[0],
             moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48))  # fmt: skip


def repeated_reference(model, layers: int, full: int, first: int):
    """``model`` at ``full`` decoder layers, layer d >= ``layers`` a copy of layer first + (d - layers) % (layers - first)."""
    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = full
    deep = type(model)(config).eval()
    state = model.state_dict()
    new = dict(state)
    for d in range(layers, full):
        s = first + (d - layers) % (layers - first)
        src = f"language_model.layers.{s}."
        new |= {k.replace(src, f"language_model.layers.{d}."): v for k, v in state.items() if src in k}
    deep.load_state_dict(new, strict=True)
    return deep


def _check(bundle, model, tmp_path, full: int, images) -> dict:
    out = tmp_path / "deep"
    deepen(bundle, out, full)
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["deepened_from"]
    assert manifest["config"]["text"]["num_hidden_layers"] == full
    graph = onnx.load(out / "decoder.onnx", load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type in ("GroupQueryAttention", "Attention")]
    assert len(attention) == full and len({i.name for i in graph.input if i.name.startswith("past_key.")}) == full
    reference = repeated_reference(model, info["from_layers"], full, info["repeats_from"])
    assert_prefill_logits(SimpleNamespace(bundle=out, model=reference), images)
    return info


@pytest.mark.parametrize("images", [[], [(64, 48)]], ids=["text_only", "one_image"])
def test_moe_layers_repeated_after_a_deepstack_layer(tmp_path_factory, tokenizer_files, tmp_path, images):
    import transformers

    root = tmp_path_factory.mktemp("deepen_moe4")
    ckpt = build_checkpoint(root / "ckpt", MOE_4, tokenizer_files)
    bundle = export(ckpt, root / "bundle", ExportOptions(), calibrator=Calibrator())
    ref_ckpt = build_checkpoint(root / "hf", MOE_4, tokenizer_files, released_experts=False)
    torch.set_grad_enabled(False)
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(str(ref_ckpt), dtype=torch.float32,
                                                                           attn_implementation="eager").eval()  # fmt: skip
    info = _check(bundle, model, tmp_path, 7, images)
    assert (info["from_layers"], info["repeats_from"]) == (4, 2)


@pytest.mark.parametrize("name", ["moe_tied_top2of4", "tied_gqa2"])
def test_the_layer_right_after_deepstack_repeated(tiny_models, tmp_path, name):
    """Three layers, DeepStack into the first two: the only layer to repeat takes one summed tensor,
    so each repeat is fed the sum of the stream's two."""
    tiny = tiny_models(name)
    info = _check(tiny.bundle, tiny.model, tmp_path, 5, [(64, 48)])
    assert (info["from_layers"], info["repeats_from"]) == (3, 2)


def test_nothing_to_repeat_is_refused(tiny_models, tmp_path):
    tiny = tiny_models("tied_mha_unsorted")  # two layers, DeepStack into both
    with pytest.raises(UserError, match="DeepStack layers"):
        deepen(tiny.bundle, tmp_path / "deep", 4)


@pytest.mark.parametrize("kv_cache", ["fp32", "int8"])
def test_every_decoder_graph_of_a_quantized_bundle(int8_bundle, tiny_one, tmp_path, kv_cache):
    """An int8 bundle with a prompt graph and both cache forms: each decoder graph is deepened and
    listed in the manifest as it is; its prompt logits stay near transformers' with the layers
    repeated (int8 weights: mean cosine over 60 positions measured 0.997 with either cache; bound 0.99)."""
    from qwen3vl_onnx.runtime.model import BundleModel

    deepen(int8_bundle, tmp_path / "deep", 5)
    manifest = json.loads((tmp_path / "deep" / "manifest.json").read_text())
    decoders = {k: g for k, g in manifest["graphs"].items() if k != "vision"}
    assert set(decoders) == {"decoder", "decoder_prefill", "decoder_int8kv", "decoder_prefill_int8kv"}
    for g in decoders.values():
        graph = onnx.load(tmp_path / "deep" / g["file"], load_external_data=False).graph
        assert [i.name for i in graph.input] == list(g["inputs"]) and [o.name for o in graph.output] == list(g["outputs"])
        assert sum(n.startswith("past_key.") for n in g["inputs"]) == 5
    m = BundleModel(tmp_path / "deep", kv_cache=kv_cache)
    ids = list(range(100, 160))
    ours = m.prefill(ids, None, None, [], m.new_cache(), logits_to_keep=len(ids))
    reference = repeated_reference(tiny_one.model, 3, 5, 2)
    ref = reference(input_ids=torch.tensor([ids]), mm_token_type_ids=torch.zeros(1, len(ids), dtype=torch.long)).logits[0].numpy()
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.mean() >= 0.99, cos
