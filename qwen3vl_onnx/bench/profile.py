"""``qwen3vl-onnx bench --profile``: where a decoder step's time goes, and whether it could go faster.

A decode step reads every weight once per call, so its time is bounded below by the weights' bytes
over the machine's memory bandwidth, whatever the kernels do. ONNX Runtime's per-node profile of
real steps (the bundle's own decoder graph, cache bound in place as the runtime binds it) is grouped
by what each node computes: each projection kind (all layers together), attention, and the rest.
Beside each matmul kind stand the bytes it reads per call, as the graph's initializers store them
(ONNX Runtime reads its own repacked layout of the same codes and scales), and the rate it reads
them at. Kinds that all read at about the machine's memory rate say a step is bound by its bytes
(only fewer bytes help); a kind far below the others, or one whose time grows with the rows over
the same bytes, is held by its kernel's compute (docs/BENCHMARKS.md, "What the profile shows").
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from ..runtime.model import KV_GRAPH_SUFFIX, BundleModel, open_session

ROWS, CACHED, STEPS = (1, 4), (100, 2000), 8
WARMUP = 2  # rounds of every (rows, cached) pair not timed: first calls allocate and map pages
EXPERT_OPS = {"QMoE", "MoE"}
MATMULS = {"MatMulNBits", "MatMul", "MatMulInteger", "DynamicQuantizeMatMul", *EXPERT_OPS}
# A weight's module: "layers.N.<module>.<tensor>" -> "<module>", or a top-level name (lm_head).
LAYER_WEIGHT = re.compile(r"layers\.\d+\.(.+)\.[a-z_]+$")
ONNX_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.UINT8: 1,
              onnx.TensorProto.INT8: 1, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT64: 8}  # fmt: skip


def node_kinds(graph: onnx.GraphProto, active_experts: float = 1.0) -> tuple[list[str], list[int]]:
    """Per node of ``graph`` (in file order, as ONNX Runtime numbers them): what it computes and the
    bytes of weights it reads. Matmuls are named by their weight's module (``mlp.gate_up_proj``,
    ``lm_head``; a fused MoE node ``mlp.experts``, its bytes times ``active_experts``, the share of
    experts one token reads); attention is ``attention``; every other node ``other: <op type>``."""
    sizes = {t.name: int(np.prod(t.dims)) * ONNX_BYTES.get(t.data_type, 4) for t in graph.initializer}
    kinds, weight_bytes = [], []
    for node in graph.node:
        weights = [i for i in node.input if i in sizes]
        if node.op_type in MATMULS and weights:
            name = weights[0].split("model.language_model.", 1)[-1]
            m = LAYER_WEIGHT.search(name)
            kind = m.group(1) if m else name.rsplit(".", 1)[0]
            share = 1.0
            if node.op_type in EXPERT_OPS:
                kind, share = kind.split(".experts", 1)[0] + ".experts", active_experts
            kinds.append(kind)
            weight_bytes.append(round(share * sum(sizes[w] for w in weights)))
        else:
            kinds.append("attention" if node.op_type == "GroupQueryAttention" else f"other: {node.op_type}")
            weight_bytes.append(0)
    return kinds, weight_bytes


def _per_run(events: list[dict]) -> list[dict[int, float]]:
    """The profile's node times (microseconds) per ``model_run``, by node index, in call order."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    nodes = sorted((e["ts"], int(e["args"]["node_index"]), e["dur"]) for e in events
                   if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))  # fmt: skip
    out: list[dict[int, float]] = [defaultdict(float) for _ in runs]
    r = 0
    for ts, index, dur in nodes:
        while r < len(runs) and ts > runs[r][1]:
            r += 1
        if r == len(runs):
            break
        out[r][index] += dur
    return out


def profile_steps(bundle: Path, rows: Sequence[int] = ROWS, cached: Sequence[int] = CACHED, steps: int = STEPS,
                  kv_cache: str | None = None) -> dict:  # fmt: skip
    """Decoder steps of the bundle for every (rows, cached) pair, ``steps`` rounds taking the pairs
    in turn (so each meets the same machine load): per kind, the median time of a step's nodes of
    that kind, its weight bytes and read rate; the step's wall time beside the nodes' sum.
    ``kv_cache``: the cache precision to run (default: the bundle's)."""
    model = BundleModel(bundle, decoder_graph=False, kv_cache=kv_cache)
    model.vision = None
    path = bundle / model.manifest["graphs"]["decoder" + KV_GRAPH_SUFFIX[model.kv_cache]]["file"]
    text = model.config.text
    active = text.num_experts_per_tok / text.num_experts if text.num_experts else 1.0
    kinds, weight_bytes = node_kinds(onnx.load(str(path), load_external_data=False).graph, active)
    cache = model.new_cache(max(rows), max(cached) + 1)
    cache.prefault()
    views = {r: cache.rows(0, r) for r in rows}
    pairs = [(r, n) for n in cached for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        model.decoder = open_session(path, None, None, profile_prefix=Path(tmp) / "step")
        order, wall = [], []
        for i in range(WARMUP + steps):
            for r, n in pairs:
                views[r].lengths[:] = n
                t = time.perf_counter()
                model.step(np.zeros(r, np.int64), views[r])
                wall.append(time.perf_counter() - t)
                order.append((r, n) if i >= WARMUP else None)
        events = json.loads(Path(model.decoder.end_profiling()).read_text())
    runs = _per_run(events)
    for e in events:  # nodes ONNX Runtime made (fusions) are numbered after the file's
        if e.get("cat") == "Node" and (i := int(e["args"]["node_index"])) >= len(kinds):
            kinds.extend(f"other: {e['args']['op_name']} (fused)" for _ in range(i + 1 - len(kinds)))
            weight_bytes.extend(0 for _ in range(i + 1 - len(weight_bytes)))
    if len(runs) != len(order):
        raise RuntimeError(f"profile has {len(runs)} runs, {len(order)} calls were made")
    labels = sorted(set(kinds), key=lambda k: (k.startswith("other"), k != "attention", k))
    result = []
    for r, n in pairs:
        mine = [i for i, o in enumerate(order) if o == (r, n)]
        per_kind = {k: [] for k in labels}
        for i in mine:
            sums: dict[str, float] = defaultdict(float)
            for index, us in runs[i].items():
                sums[kinds[index]] += us
            for k in labels:
                per_kind[k].append(sums[k] / 1e3)
        ms = {k: float(np.median(v)) for k, v in per_kind.items()}
        result.append({"rows": r, "cached": n, "step_ms": 1e3 * float(np.median([wall[i] for i in mine])),
                       "nodes_ms": float(np.median([sum(runs[i].values()) / 1e3 for i in mine])), "kinds_ms": ms})  # fmt: skip
    read = defaultdict(int)
    for k, b in zip(kinds, weight_bytes, strict=True):
        read[k] += b
    return {"bundle": str(bundle), "kv_cache": model.kv_cache, "steps": steps, "weight_bytes": dict(read),
            "cache_bytes_per_position": model.cache_position_bytes, "runs": result}  # fmt: skip


def profile_markdown(res: dict) -> str:
    """One table: a row per kind, a column per (rows, cached) pair; matmuls with MB and GB/s at 1 row."""
    machine = res["machine"]
    runs, wb = res["profile"]["runs"], res["profile"]["weight_bytes"]
    first = next((x for x in runs if x["rows"] == 1), runs[0])
    head = " | ".join(f"{x['rows']} row{'s' * (x['rows'] > 1)}, {x['cached']} cached (ms)" for x in runs)
    lines = [f"Decoder step profile: {res['profile']['bundle']}, {res['profile']['kv_cache']} KV cache, medians of "
             f"{res['profile']['steps']} rounds; {machine['cpu']}, {machine['cores']} cores, "
             f"flags {' '.join(machine['cpu_flags'])}, onnxruntime {machine['onnxruntime']}", "",
             f"| kind | weights (MB) | {head} | read rate at {first['rows']} row, {first['cached']} cached (GB/s) |",
             "|---|---|" + "---|" * len(runs) + "---|"]  # fmt: skip
    for kind in first["kinds_ms"]:
        cells = " | ".join(f"{x['kinds_ms'][kind]:.2f}" for x in runs)
        mb = wb.get(kind, 0) / 1e6
        ms = first["kinds_ms"][kind]
        rate = f"{mb / ms:.1f}" if mb and ms else ""
        lines.append(f"| {kind} | {f'{mb:.1f}' if mb else ''} | {cells} | {rate} |")
    lines.append("| all nodes | {:.1f} | {} | |".format(sum(wb.values()) / 1e6, " | ".join(f"{x['nodes_ms']:.1f}" for x in runs)))
    lines.append("| step, wall | | {} | |".format(" | ".join(f"{x['step_ms']:.1f}" for x in runs)))
    per_position = res["profile"]["cache_bytes_per_position"]
    cached = sorted({x["cached"] for x in runs})
    reads = ", ".join(f"{per_position * n / 1e6:.1f} MB of cache per row at {n} cached" for n in cached)
    lines += ["", f"Attention reads {reads}; a matmul kind's read rate is its MB over its ms at 1 row."]
    return "\n".join(lines) + "\n"
