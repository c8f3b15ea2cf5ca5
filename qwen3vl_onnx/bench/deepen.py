"""A bundle at the released depth made from a depth-reduced one: the extra layers read the weights of layers it has.

Why: a random 30B-A3B checkpoint at 48 layers is ~62 GB of bf16, more than these machines' disks
hold, so ``bench --layers N`` measures N layers and scales to 48 from two depths, which multiplies
each run's noise about tenfold (two such fits of the same code gave 0.84x and 1.13x llama.cpp).
Here layers N..full-1 repeat layers ``first``..N-1 (those after every DeepStack injection), each
repeated layer with initializers of its own that point at the same bytes of ``decoder.onnx.data``.
ONNX Runtime prepacks every matmul's weights on its own, and a decode step streams full depth's
bytes from memory (the repeated layers are far larger than any cache), so speed is the released
depth's; its outputs are not a trained model's (weights repeat). Weights a kernel reads straight
from the mapped file (QMoE's experts) are resident once, not once per repeat: the real peak is
at most the measured one plus one stored layer per repeated layer, which the report states.

    python -m qwen3vl_onnx.bench.deepen BUNDLE OUT FULL_LAYERS
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import onnx

from .. import graph_io as io
from ..errors import UserError
from ..export.bundle import io_entries
from ..export.segments import FINAL_NORM, LAYER_PREFIX, final_inputs, residual_inputs, upstream

INDEXED = re.compile(r"(\.)(\d+)$")  # past_key.3, present_value.3, kv_scale.key.3


def layer_nodes(graph: onnx.GraphProto, layer: int, ins: tuple[str, ...], outs: tuple[str, ...]) -> list[onnx.NodeProto]:
    """Layer ``layer``'s nodes: those that depend on its input stream, weights or past cache and that
    its presents or ``outs`` depend on (shared precomputation such as rotary tables is left out)."""
    ancestors = upstream(graph, [io.present_key(layer), io.present_value(layer), *outs], ins)
    own = f"{LAYER_PREFIX}{layer}."
    reached = set(ins)
    out = []
    for i, n in enumerate(graph.node):  # topological order
        if i in ancestors and any(x in reached or x.startswith(own) or own_index(x) == layer
                                      for x in n.input if x):  # fmt: skip
            reached.update(n.output)
            out.append(n)
    return out


def own_index(name: str) -> int | None:
    m = INDEXED.search(name)
    return int(m.group(2)) if m else None


def relabel(name: str, src: int, dst: int) -> str:
    """A layer-owned name of layer ``src`` as layer ``dst``'s."""
    if name.startswith(f"{LAYER_PREFIX}{src}."):
        return f"{LAYER_PREFIX}{dst}." + name[len(f"{LAYER_PREFIX}{src}.") :]
    if own_index(name) == src:
        return INDEXED.sub(rf"\g<1>{dst}", name)
    return name


def repeat_start(graph: onnx.GraphProto, layers: int, deepstack: int) -> int:
    """The first layer to repeat: past every DeepStack injection, preferably one taking the residual
    stream as the final norm does (a layer right after an injection takes one summed tensor, the
    others the fused skip norm's two; a repeat of the former is fed their sum)."""
    carry = residual_inputs(graph, layers) + [final_inputs(graph)]
    return next((i for i in range(deepstack, layers) if len(carry[i]) == len(carry[layers])), deepstack)


def deepen_graph(model: onnx.ModelProto, layers: int, full: int, first: int) -> onnx.ModelProto:
    """``model`` (loaded without external data) with layers ``layers``..``full-1`` repeating layers
    ``first``..``layers-1`` in turn, inserted between the last layer and the final norm."""
    g = model.graph
    carry = residual_inputs(g, layers) + [final_inputs(g)]
    inits = {t.name: t for t in g.initializer}
    inputs = {v.name: v for v in g.input}
    outputs = {v.name: v for v in g.output}
    tail_start = next(i for i, n in enumerate(g.node) if FINAL_NORM in n.input)
    head, tail = list(g.node[:tail_start]), list(g.node[tail_start:])
    new_inputs, new_outputs, new_inits, copies = [], [], [], []
    stream = carry[layers]
    for dst in range(layers, full):
        src = first + (dst - layers) % (layers - first)
        nodes = layer_nodes(g, src, carry[src], carry[src + 1])
        if len(carry[src]) == 1 < len(stream):
            total = f"residual_sum_L{dst}"
            copies.append(onnx.helper.make_node("Add", list(stream), [total]))
            stream = (total,)
        rename = dict(zip(carry[src], stream, strict=True))
        made = {o for n in nodes for o in n.output}
        for t in made:
            rename.setdefault(t, relabel(t, src, dst) if t in outputs else f"{t}_L{dst}")
        for n in nodes:
            for x in n.input:
                if x in rename or not x:
                    continue
                if x in inits and relabel(x, src, dst) != x:
                    rename[x] = relabel(x, src, dst)
                    c = onnx.TensorProto()
                    c.CopyFrom(inits[x])
                    c.name = rename[x]
                    new_inits.append(c)  # same external bytes, its own initializer: prepacked on its own
                elif x in inputs and relabel(x, src, dst) != x:
                    rename[x] = relabel(x, src, dst)
                    v = onnx.ValueInfoProto()
                    v.CopyFrom(inputs[x])
                    v.name = rename[x]
                    new_inputs.append(v)
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"{n.name}_L{dst}" if n.name else ""
            c.input[:] = [rename.get(x, x) for x in n.input]
            c.output[:] = [rename.get(x, x) for x in n.output]
            copies.append(c)
        for t in made & outputs.keys():
            v = onnx.ValueInfoProto()
            v.CopyFrom(outputs[t])
            v.name = rename[t]
            new_outputs.append(v)
        stream = tuple(rename[t] for t in carry[src + 1])
    last = dict(zip(carry[layers], stream, strict=True))
    for n in tail:
        n.input[:] = [last.get(x, x) for x in n.input]
    del g.node[:]
    g.node.extend(head + copies + tail)
    g.input.extend(new_inputs)
    g.output.extend(new_outputs)
    g.initializer.extend(new_inits)
    return model


def deepen(bundle: Path, out: Path, full: int) -> None:
    """Write ``out``: ``bundle`` at ``full`` decoder layers; every other file is a hard link to the
    bundle's (ONNX Runtime refuses external data behind a symbolic link leaving the model's folder)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    text = manifest["config"]["text"]
    layers, deepstack = text["num_hidden_layers"], len(manifest["config"]["vision"]["deepstack_visual_indexes"])
    if not deepstack < layers < full:
        raise UserError(f"need DeepStack layers ({deepstack}) < bundle layers ({layers}) < full layers ({full})")
    decoders = {k: g for k, g in manifest["graphs"].items() if k != "vision"}  # plain, prompt and int8-cache forms
    models = {k: onnx.load(bundle / g["file"], load_external_data=False) for k, g in decoders.items()}
    first = repeat_start(models["decoder"].graph, layers, deepstack)
    out.mkdir(parents=True, exist_ok=False)
    for f in bundle.iterdir():
        if f.name not in {g["file"] for g in decoders.values()} | {"manifest.json", "config.json"}:
            (out / f.name).hardlink_to(f)
    for key, model in models.items():
        deep = deepen_graph(model, layers, full, first)
        onnx.save(deep, out / decoders[key]["file"])
        decoders[key]["inputs"], decoders[key]["outputs"] = io_entries(deep.graph.input), io_entries(deep.graph.output)
    text["num_hidden_layers"] = full
    manifest["deepened_from"] = {"bundle": str(bundle.resolve()), "from_layers": layers, "repeats_from": first}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    cfg = json.loads((bundle / "config.json").read_text())
    cfg.get("text_config", cfg)["num_hidden_layers"] = full
    (out / "config.json").write_text(json.dumps(cfg, indent=1))


def deepen_gguf(src: Path, dst: Path, full: int, first: int, gguf_py: Path) -> None:
    """llama.cpp's GGUF of the same depth-reduced checkpoint at ``full`` layers, repeating the same
    layers. GGUF requires each tensor's data at its own offset, so the repeats are copies on disk
    (llama.cpp maps the file: they are resident once each, as in a real full-depth GGUF).
    ``gguf_py``: the gguf-py folder of the llama.cpp tree the converter came from."""
    sys.path.insert(0, str(gguf_py))
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    layers = reader.fields[f"{arch}.block_count"].contents()
    writer = gguf.GGUFWriter(f"{dst}.partial", arch)
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        value = full if f.name == f"{arch}.block_count" else f.contents()
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, value, f.types[0], sub_type=sub)
    by_name = {t.name: t for t in reader.tensors}
    tensors = [(t.name, t) for t in reader.tensors]
    for d in range(layers, full):
        s = first + (d - layers) % (layers - first)
        tensors += [(f"blk.{d}." + t.name[len(f"blk.{s}.") :], t) for n, t in by_name.items() if n.startswith(f"blk.{s}.")]
    for name, t in tensors:
        writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    Path(f"{dst}.partial").replace(dst)


def measure_full_depth(bundle: Path, full: int, repeats: int, peers: Path | None, pairs: int, pause_s: float) -> dict:
    """``bench --layers N --repeat-layers``: ours at ``full`` layers made by ``deepen`` (measured in
    a child as any bundle), and with ``peers`` (the folder holding llama.cpp's Q4_0 GGUF of the
    same checkpoint) prefill-256 and decode in turns with that GGUF deepened the same way."""
    from .depth import layer_bytes
    from .peer_llamacpp import converter_root
    from .run import child_measure
    from .turns import our_worker_command, take_turns

    deep = bundle.with_name(f"{bundle.name}-repeated{full}")
    shutil.rmtree(deep, ignore_errors=True)  # links to the bundle just exported: a second or less
    deepen(bundle, deep, full)
    info = json.loads((deep / "manifest.json").read_text())["deepened_from"]
    out: dict = {"layers": full, "from_layers": info["from_layers"], "repeats_from": info["repeats_from"],
                 "ours": child_measure(deep, repeats)}  # fmt: skip
    # the repeats map the exported layers' file pages once; a real bundle maps each layer's own
    out["real_peak_rss_gb_at_most"] = out["ours"]["peak_rss_gb"] + (full - info["from_layers"]) * layer_bytes(bundle) / 1e9
    gguf = peers / "llama-Q4_0.gguf" if peers else None
    if gguf is None or not gguf.is_file():
        return out
    deep_peers = peers.with_name(f"{peers.name}-repeated{full}")
    deep_peers.mkdir(exist_ok=True)
    made = deep_peers / gguf.name
    if not made.is_file() or made.stat().st_mtime < gguf.stat().st_mtime:
        print(f"writing llama.cpp's GGUF at {full} layers to {deep_peers}", file=sys.stderr)
        deepen_gguf(gguf, deep_peers / gguf.name, full, info["repeats_from"], converter_root(peers) / "gguf-py")
    shutil.copy(peers / "llama-convert.json", deep_peers)  # the worker reads the cached conversion's record
    theirs = [sys.executable, "-m", "qwen3vl_onnx.bench.peer_llamacpp", "--serve", "-", str(deep_peers), "Q4_0"]
    print(f"measuring {full} layers in turns with llama.cpp Q4_0", file=sys.stderr)
    out["turns"] = {"llama.cpp Q4_0": take_turns(our_worker_command(deep), theirs, ["prefill_256_tok_s", "decode_tok_s"],
                                                 pairs, pause_s)}  # fmt: skip
    return out


def full_depth_markdown(r: dict) -> str:
    """The ``measure_full_depth`` figures as a paragraph of the bench report."""
    med = {k: v["median"] if isinstance(v, dict) else v for k, v in r["ours"].items()}
    text = (
        f"\nAt {r['layers']} decoder layers, layers {r['repeats_from']}-{r['from_layers'] - 1} repeated "
        f"after the {r['from_layers']} exported (their weights read again; speed and memory of the full depth): "
        f"decode {med['decode_tok_s']:.3g} tok/s, prefill 256 {med['prefill_256_tok_s']:.3g} tok/s, first token with "
        f"a 448x448 picture {med['ttft_448_s']:.3g} s, peak RSS {med['peak_rss_gb']:.2f} GB (a real bundle of this depth: "
        f"at most {r['real_peak_rss_gb_at_most']:.2f} GB, each repeated layer's stored bytes added)."
    )
    for name, t in r.get("turns", {}).items():
        for task, label in (("decode_tok_s", "decode"), ("prefill_256_tok_s", "prefill 256")):
            x, q = t[task], t[task]["pair_ratios"]
            text += (
                f" {label} in turns with {name}: ours {x['ours']['median']:.3g}, theirs {x['peer']['median']:.3g} tok/s, "
                f"ratio per pair {q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f})."
            )
    return text + "\n"


if __name__ == "__main__":
    deepen(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
