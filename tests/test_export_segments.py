"""The decoder cut into runs of layers (``export.segments``) and the KV cache calibration that runs
it a run at a time: the same ranges as one session of the whole decoder, at any cut."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

from qwen3vl_onnx.calibration import Calibrator
from qwen3vl_onnx.config import Qwen3VLConfig
from qwen3vl_onnx.export.bundle import export
from qwen3vl_onnx.export.options import ExportOptions
from qwen3vl_onnx.export.segments import final_inputs, plan, segments
from qwen3vl_onnx.runtime.model import BundleModel, read_manifest

from .conftest import build_checkpoint

# More layers than DeepStack features, so runs start both after a DeepStack layer (one tensor in)
# and inside the fused skip-norm chain (two tensors in); one MoE checkpoint with a dense layer.
CUT_GEOMETRIES = {
    "dense_5_layers": dict(tie=True, heads=4, kv=2, layers=5, depth=2, deepstack=[0]),
    "moe_4_layers": dict(tie=False, heads=4, kv=2, layers=4, depth=2, deepstack=[1],
                         moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[2])),
}  # fmt: skip


def test_plan_cuts_consecutive_runs_within_the_budget():
    assert plan([3, 3, 3, 3], 6) == [(0, 2), (2, 4)]
    assert plan([3, 3, 3, 3], 7) == [(0, 2), (2, 4)]
    assert plan([3, 3, 3, 3], 100) == [(0, 4)]
    assert plan([5, 9, 1], 4) == [(0, 1), (1, 2), (2, 3)]  # a layer over the budget is a run of its own
    assert plan([], 4) == []


@pytest.fixture(scope="module", params=list(CUT_GEOMETRIES))
def cut_bundle(request, tmp_path_factory, tokenizer_files):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = build_checkpoint(root / "ckpt", CUT_GEOMETRIES[request.param], tokenizer_files)
    return export(ckpt, root / "int4", ExportOptions("int4"), calibrator=Calibrator())


def _layers(bundle) -> int:
    return Qwen3VLConfig.from_manifest(read_manifest(bundle)["config"]).text.num_hidden_layers


def test_every_layer_and_weight_is_in_exactly_one_run(cut_bundle):
    graph = onnx.load(cut_bundle / "decoder.onnx", load_external_data=False)
    layers = _layers(cut_bundle)
    runs = segments(graph, layers, 1)
    assert [(s.first, s.stop) for s in runs] == [(i, i + 1) for i in range(layers)]
    assert runs[0].inputs == ("inputs_embeds",) and runs[-1].outputs == final_inputs(graph.graph)
    assert all(a.outputs == b.inputs for a, b in itertools.pairwise(runs))
    assert {len(s.inputs) for s in runs[1:]} == {1, 2}  # after a DeepStack layer; inside the skip-norm chain
    for s in runs:
        names = [t.name for t in s.model.graph.initializer if t.name.startswith("model.language_model.layers.")]
        assert {int(n.split(".")[3]) for n in names} == {s.first}, (s.first, sorted(names)[:3])
        assert not any("lm_head" in t.name or "embed_tokens" in t.name for t in s.model.graph.initializer)


def test_ranges_a_layer_at_a_time_equal_the_whole_decoders(cut_bundle):
    whole, layered = Calibrator(1 << 40).ranges(cut_bundle), Calibrator(1).ranges(cut_bundle)
    assert (whole > 0).all()
    assert abs(layered - whole).max() <= 1e-6 * abs(whole).max()
    assert not list(cut_bundle.glob(".calibration-*"))  # the runs' graph files are gone


def test_the_int8_agreement_check_is_the_runtimes_cosine(cut_bundle):
    """The check runs the layers in cut graphs and the head in one of its own: its float logits must
    be the whole decoder's (within 1e-4 of their largest; measured 1e-6), and its cosines those of
    the runtime's int8 cache against its float cache, at any cut."""
    from qwen3vl_onnx.calibration import KEEP

    layered, whole = Calibrator(1), Calibrator(1 << 40)
    for c in (layered, whole):
        c.ranges(cut_bundle)
    got = layered.agreement(cut_bundle, "decoder.int8kv.onnx")
    assert np.allclose(got, whole.agreement(cut_bundle, "decoder.int8kv.onnx"), rtol=0, atol=1e-6)
    runtime = {}
    for kv in ("fp32", "int8"):
        m = BundleModel(cut_bundle, kv_cache=kv)
        runtime[kv] = [m.forward(f["inputs_embeds"], f["position_ids"], m.new_cache(1, int(f["total_sequence_length"])),
                                 f["visual_index"], f["deepstack_embeds"], KEEP)[0] for f in layered.prompts]  # fmt: skip
    for mine, theirs in zip(layered.reference, runtime["fp32"], strict=True):
        assert mine.shape == theirs.shape and abs(mine - theirs).max() <= 1e-4 * abs(theirs).max()
    cos = lambda a, b: float(np.mean((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))  # noqa: E731
    want = [cos(a, b) for a, b in zip(runtime["int8"], runtime["fp32"], strict=True)]
    assert np.allclose(got, want, rtol=0, atol=1e-5), (got, want)
    assert all(0.99 < c < 1 - 1e-7 for c in got)  # the int8 cache is close to the float one, and not the same


def test_a_layer_the_graph_lacks_is_named(cut_bundle):
    graph = onnx.load(cut_bundle / "decoder.onnx", load_external_data=False)
    layers = _layers(cut_bundle)
    with pytest.raises(ValueError, match=f"layer {layers}'s input_layernorm"):
        segments(graph, layers + 1, 1)
