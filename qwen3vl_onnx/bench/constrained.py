"""What constrained decoding costs (``bench --constrained``), in process on a bundle:

- compile time per request: the grammar of a JSON schema and of two tools (median of repeats);
- per token: a JSON-schema mask (feed the chosen token, fill the mask, apply it to the logits) for 1
  and for 4 sequences, each its own matcher, against a decoder step of 1 and of 4 rows timed in the
  same loop, so the ratio is the overhead a constrained stream pays on this machine.

The grammar sees real logits: the tokens are drawn from the masked logits of the bundle's own steps.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .procstats import stats

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind", "count", "colors", "note"],
          "properties": {"kind": {"enum": ["circle", "square", "triangle"]}, "count": {"type": "integer"},
                         "colors": {"type": "array", "items": {"type": "string"}}, "note": {"type": "string"}}}  # fmt: skip
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}
SEARCH = {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH}}]  # fmt: skip


def measure_constrained(bundle: Path, steps: int = 48, repeats: int = 20, rows: int = 4) -> dict:
    from ..runtime.constrain import TokenMask, output_spec, plan
    from ..runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    t = time.perf_counter()
    compiler = pipe.grammars()
    built = time.perf_counter() - t
    fmt = output_spec({"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    tools = output_spec(None, TOOLS, "required")
    compile_s = {name: stats([_timed(lambda s=spec: plan(s, compiler)) for _ in range(repeats)])
                 for name, spec in (("json_schema", fmt), ("tools", tools))}  # fmt: skip
    out = {"tokenizer_view_s": built, "compile_s": compile_s, "vocab": int(pipe.config.text.vocab_size)}
    prompt = pipe.prepare([{"role": "user", "content": "Describe the picture as JSON."}])
    for n in (1, rows):
        model = pipe.model
        cache = model.new_cache(n, len(prompt.ids) + steps + 1)
        for r in range(n):  # every row the same prompt; each sequence its own matcher and draws
            view = cache.rows(r, r + 1)
            last = model.prefill(prompt.ids, None, None, [], view)[0, -1]
        masks = [TokenMask(compiler, plan(fmt, compiler)) for _ in range(n)]
        rng = np.random.default_rng(0)
        generated: list[list[int]] = [[] for _ in range(n)]
        logits = np.tile(last, (n, 1))
        step_s, mask_s = [], []
        for _ in range(steps):
            t = time.perf_counter()
            for r in range(n):
                masks[r](logits[r], prompt.ids, generated[r])
            mask_s.append(time.perf_counter() - t)
            tokens = np.array([_draw(logits[r], rng) for r in range(n)], np.int64)
            for r in range(n):
                generated[r].append(int(tokens[r]))
            t = time.perf_counter()
            logits = model.step(tokens, cache)
            step_s.append(time.perf_counter() - t)
        m, s = float(np.median(mask_s)), float(np.median(step_s))
        out[f"rows_{n}"] = {"mask_ms": 1e3 * m, "step_ms": 1e3 * s, "overhead": m / s, "steps": steps}
    return out


def _timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    z = logits - logits.max()
    p = np.exp(z)
    return int(rng.choice(len(p), p=p / p.sum()))


def constrained_markdown(result: dict) -> str:
    c = result["constrained"]
    lines = ["| | mask per token (ms) | decoder step (ms) | overhead |", "|---|---|---|---|"]
    for key in sorted(k for k in c if k.startswith("rows_")):
        r = c[key]
        lines.append(f"| {key[5:]} stream(s) | {r['mask_ms']:.3f} | {r['step_ms']:.1f} | {100 * r['overhead']:.2f}% |")
    m = result["machine"]
    lines += ["", f"Grammar compile per request: JSON schema {1e3 * c['compile_s']['json_schema']['median']:.2f} ms, "
              f"two tools {1e3 * c['compile_s']['tools']['median']:.2f} ms (medians); the tokenizer's grammar view, built "
              f"once per process: {c['tokenizer_view_s']:.2f} s. Vocabulary {c['vocab']}.",
              f"Machine: {m['cpu']}, {m['cores']} cores, CPU flags: {' '.join(m.get('cpu_flags', [])) or 'unknown'}, "
              f"onnxruntime {m['onnxruntime']}."]  # fmt: skip
    return "\n".join(lines) + "\n"
