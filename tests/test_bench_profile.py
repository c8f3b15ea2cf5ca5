"""``bench --profile``: every node of a real decoder step lands in one kind, the matmul kinds carry
their weights' bytes, and the times are the step's own."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen3vl_onnx.bench.profile import node_kinds, profile_markdown, profile_steps
from qwen3vl_onnx.bench.run import machine

PROJECTIONS = {"self_attn.q_k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj", "lm_head"}


def test_node_kinds_name_matmuls_by_their_weights_module():
    init = [numpy_helper.from_array(np.zeros((64, 8), np.uint8), "model.language_model.layers.3.mlp.down_proj.qweight"),
            numpy_helper.from_array(np.zeros(16, np.float32), "model.language_model.layers.3.mlp.down_proj.scales"),
            numpy_helper.from_array(np.zeros((4, 4), np.float32), "lm_head.weight")]  # fmt: skip
    nodes = [helper.make_node("MatMulNBits", ["x", init[0].name, init[1].name], ["a"], domain="com.microsoft"),
             helper.make_node("GroupQueryAttention", ["a"], ["b"], domain="com.microsoft"),
             helper.make_node("Add", ["b", "b"], ["c"]),
             helper.make_node("MatMul", ["c", "lm_head.weight"], ["y"])]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)  # fmt: skip
    kinds, nbytes = node_kinds(g)
    assert kinds == ["mlp.down_proj", "attention", "other: Add", "lm_head"]
    assert nbytes == [64 * 8 + 16 * 4, 0, 0, 16 * 4]
    # a fused expert node is one kind, counted at the share of experts a token reads
    experts = numpy_helper.from_array(np.zeros((8, 16, 4), np.uint8), "model.language_model.layers.0.mlp.experts.fc1.qweight")
    moe = helper.make_node("QMoE", ["x", "r", experts.name], ["y"], domain="com.microsoft")
    g = helper.make_graph([moe], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [experts])
    assert node_kinds(g, active_experts=0.25) == (["mlp.experts"], [8 * 16 * 4 // 4])


def test_profile_of_an_int4_bundle_accounts_for_every_projection(tiny_one):
    bundle = tiny_one.bundle_with(precision="int4")
    res = profile_steps(bundle, rows=(1, 3), cached=(5, 40), steps=3)
    # k/v x kv heads x dim x (4 bytes on the first layer, 1 on the other two)
    assert res["kv_cache"] == "int8" and res["cache_bytes_per_position"] == 2 * 2 * 32 * (4 + 1 + 1)
    assert [(r["rows"], r["cached"]) for r in res["runs"]] == [(1, 5), (3, 5), (1, 40), (3, 40)]
    # every projection kind of the graph is named, with the bytes of its weights in the file
    graph = onnx.load(str(bundle / "decoder.int8kv.onnx"), load_external_data=False).graph
    sizes = {t.name: int(np.prod(t.dims)) * (4 if t.data_type == TensorProto.FLOAT else 1) for t in graph.initializer}
    matmul_bytes = sum(sizes[i] for n in graph.node if n.op_type == "MatMulNBits" for i in n.input if i in sizes)
    assert PROJECTIONS <= set(res["weight_bytes"]) and sum(res["weight_bytes"].values()) == matmul_bytes
    for run in res["runs"]:
        assert PROJECTIONS | {"attention"} <= set(run["kinds_ms"])
        # (ONNX Runtime's profile counts whole microseconds: one tiny matmul may read 0)
        assert min(run["kinds_ms"].values()) >= 0 and sum(run["kinds_ms"][k] for k in PROJECTIONS) > 0
        # per call, each kind's time <= the nodes' sum <= the call's wall time, so the medians keep that
        # order (sums of medians do not: on a loaded machine stalls land in different kinds per call)
        assert max(run["kinds_ms"].values()) <= run["nodes_ms"] <= run["step_ms"] and run["nodes_ms"] > 0
    fp32 = profile_steps(bundle, rows=(1,), cached=(5,), steps=1, kv_cache="fp32")  # the bundle's other cache
    assert fp32["kv_cache"] == "fp32" and fp32["cache_bytes_per_position"] == 2 * 2 * 32 * 4 * 3
    table = profile_markdown({"profile": res, "machine": machine()})
    assert "| lm_head |" in table and "| attention |" in table and "3 rows, 40 cached (ms)" in table
