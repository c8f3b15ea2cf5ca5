"""Bench output: JSON as measured, a markdown table with ratios against peers, and a PNG bar chart."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

# (key in results, label, higher is better)
ROWS = [
    ("vision_448_s", "vision encode 448x448 (s)", False),
    ("vision_896_s", "vision encode 896x896 (s)", False),
    ("prefill_32_tok_s", "prefill 32 tokens (tok/s)", True),
    ("prefill_256_tok_s", "prefill 256 tokens (tok/s)", True),
    ("ttft_448_s", "first token, 448x448 image + question (s)", False),
    ("second_turn_ttft_s", "second turn about a 448x448 picture: first token (s)", False),
    ("second_turn_recomputed_ttft_s", "the same, whole history recomputed (s)", False),
    ("decode_tok_s", "decode (tok/s)", True),
]


def _fmt(d) -> str:
    if isinstance(d, dict):
        return f"{d['median']:.3g} ({d['min']:.3g}-{d['max']:.3g})"
    return f"{d:.3g}" if isinstance(d, float) else str(d)


def _median(d):
    return d["median"] if isinstance(d, dict) else d


def markdown(result: dict) -> str:
    ours, peers = result["ours"], result.get("peers", {})
    live = {k: v for k, v in peers.items() if "skipped" not in v}
    block = f" b{result['block_size']}" if result.get("block_size") and result["precision"] in ("int4", "int8") else ""
    if result.get("int8_projections") and result["precision"] == "int4":
        block += f" ({', '.join(result['int8_projections'])} 8-bit)"
    if result.get("prefill_int8"):
        block += " + int8 prefill graph"
    head = ["metric", f"qwen3vl-onnx {result['precision']}{block}"] + [f"{p}" for p in live] + [f"ratio vs {p}" for p in live]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, higher in ROWS:
        if key not in ours:
            continue
        row = [label, _fmt(ours[key])]
        ratios = []
        for p in live.values():
            pv = p.get(key)
            row.append(_fmt(pv) if pv is not None else "-")
            if pv is None:
                ratios.append("-")
            else:
                a, b = _median(ours[key]), _median(pv)
                ratios.append(f"{(a / b if higher else b / a):.2f}x")
        lines.append("| " + " | ".join(row + ratios) + " |")
    m = result["machine"]
    text_part = f" (without the vision tower {ours['text_gb']:.3f} GB)" if "text_gb" in ours else ""
    extra = [
        "",
        f"Shape {result['shape']}, {result['precision']}; {_export_figures(result)}; bundle {ours['bundle_gb']:.2f} GB"
        f"{text_part}; "
        f"load {ours['load_s']:.2f} s; inference peak RSS {ours['peak_rss_gb']:.2f} GB{_kv_cache_figures(result)}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU flags: {' '.join(m.get('cpu_flags', [])) or 'unknown'}, "
        f"onnxruntime {m['onnxruntime']}. Medians (min-max) of repeated runs; "
        "ratios > 1 mean qwen3vl-onnx is faster.",
    ]
    labels = {key: label for key, label, _ in ROWS}
    for name, t in result.get("turns", {}).items():
        if "skipped" in t:
            extra.append(f"- in turns with {name}: skipped ({t['skipped']})")
            continue
        for task, f in t.items():
            r = f["pair_ratios"]
            extra.append(
                f"{labels[task]}, in turns with {name}, {r['n']} pairs: ours {_fmt(f['ours'])}, theirs {_fmt(f['peer'])}; "
                f"ratio per pair {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})."
            )
    for name, p in peers.items():
        if "skipped" in p:
            extra.append(f"- {name}: skipped ({p['skipped']})")
    if "scaled" in result:
        from .depth import scaled_markdown

        extra.append(scaled_markdown(result["scaled"]))
    if "full_depth" in result:
        from .deepen import full_depth_markdown

        extra.append(full_depth_markdown(result["full_depth"]))
    return "\n".join(lines + extra) + "\n"


def chart(result: dict, path: Path) -> None:
    """Horizontal bars, one group per metric, normalised to the best system in each group."""
    systems = {"qwen3vl-onnx": result["ours"]} | {k: v for k, v in result.get("peers", {}).items() if "skipped" not in v}
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    rows = [(k, lbl, hi) for k, lbl, hi in ROWS if k in result["ours"]]
    bar_h, gap, left, width = 16, 14, 330, 420
    height = 30 + len(rows) * (len(systems) * bar_h + gap) + 20 * len(systems)
    img = Image.new("RGB", (left + width + 120, height), "white")
    d = ImageDraw.Draw(img)
    y = 10
    for key, label, higher in rows:
        raw = [s.get(key) for s in systems.values()]
        vals = [_median(v) if v is not None else None for v in raw]
        speed = [0.0 if v is None else (v if higher else 1 / v) for v in vals]
        top = max(speed) or 1
        d.text((5, y + 2), label, fill="black")
        for i, (v, s) in enumerate(zip(vals, speed, strict=True)):
            if v is None:
                d.text((left + 4, y + 2), "not measured", fill="gray")
            else:
                d.rectangle((left, y, left + int(width * s / top), y + bar_h - 3), fill=colors[i % len(colors)])
                d.text((left + int(width * s / top) + 4, y + 2), f"{v:.3g}", fill="black")
            y += bar_h
        y += gap
    for i, name in enumerate(systems):
        d.rectangle((10, y, 22, y + 12), fill=colors[i % len(colors)])
        d.text((28, y), name, fill="black")
        y += 20
    img.save(path)


def _kv_cache_figures(result: dict) -> str:
    """Which KV cache the figures ran over: the bundle's default, as its export chose it."""
    kv = result.get("kv_cache")
    if not kv:
        return ""
    if kv["default"] != "int8":
        return f"; {kv['default']} KV cache"
    mean = kv.get("agreement_mean_cosine")
    check = f", logit cosine {mean:.5f} against the float cache" if mean is not None else ""
    return f"; int8 KV cache ({kv.get('float_layers') or 0} float layers{check})"


def _export_figures(result: dict) -> str:
    """The export's time and memory, or that the bundle was given (exported elsewhere, not measured here)."""
    if "export_s" not in result:
        return "bundle given with --bundle (export not measured)"
    return f"export {result['export_s']:.1f} s, export peak RSS {result.get('export_peak_rss_gb', float('nan')):.2f} GB"
