"""``bench --batch N``: N picture requests answered by ``batch`` against a loop of ``Pipeline.generate``.

Both run in one process on the same bundle, one after the other, with the model loaded before the
clock starts: the loop calls ``generate`` request by request (what a user writes without this
project's batch command), the batch run posts the same bodies through the server's app and engine
(``server.batch.run_requests``, as ``qwen3vl-onnx batch`` does) with ``--parallel`` slots. Answers
are greedy and compared as text (a batched step may break a near-tie the other way: counted).

``--ray-actors N`` adds a third run: the same requests on N Ray Data actors of a local Ray cluster
(``batch --ray local``), timed from the call to the last answer, so Ray's start and every actor's
model load are inside its figure (stated in the table).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .serve import png_data_url


def pictures(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Noisy pictures with a few flat shapes: each a different prompt of the same length."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        arr[y : y + size // 3, x : x + size // 3] = rng.integers(0, 256, 3)
        out.append(Image.fromarray(arr))
    return out


def measure_batch(bundle: Path, n: int, parallel: int, size: int = 256, tokens: int = 64, ray_actors: int | None = None) -> dict:
    from ..runtime.pipeline import Pipeline
    from ..server.batch import Request, Summary, Writer, run_requests, started
    from ..server.launch import build_app
    from ..server.settings import ServerSettings

    imgs = pictures(n, size)
    question = "Describe this picture in detail."
    pipe = Pipeline.from_bundle(bundle)
    t = time.perf_counter()
    loop = [pipe.generate([{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": question}]}],
                          max_new_tokens=tokens, temperature=0, ignore_eos=True).text for im in imgs]  # fmt: skip
    loop_s = time.perf_counter() - t
    del pipe

    settings = ServerSettings(model_name="bench", parallel=parallel, ctx_size=4096, ui=False)
    app = build_app(bundle, settings)
    reqs = [Request(i + 1, f"r{i}", "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(im)}},
                                                               {"type": "text", "text": question}]}],
                     "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
            for i, im in enumerate(imgs)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        writer, summary = Writer(out), Summary()

        async def run() -> float:
            async with started(app):
                start = time.perf_counter()
                await run_requests(app, reqs, writer, summary, parallel, lambda *_: None)
                return time.perf_counter() - start

        batch_s = asyncio.run(run())
        writer.close()
        answers = _answers(out)
    same = sum(answers.get(f"r{i}") == text for i, text in enumerate(loop))
    result = {"requests": n, "picture": size, "tokens": tokens, "parallel": parallel, "loop_s": loop_s, "batch_s": batch_s,
              "loop_req_s": n / loop_s, "batch_req_s": n / batch_s, "ratio": loop_s / batch_s, "same_answers": same,
              "failed": summary.failed}  # fmt: skip
    if ray_actors:
        result.update(_on_ray(bundle, settings, reqs, ray_actors, loop, answers))
    return result


def _on_ray(bundle: Path, settings: object, reqs: list, actors: int, loop: list[str], local: dict[str, str]) -> dict:
    from ..server.batch import Summary, Writer
    from ..server.ray_batch import on_ray

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        writer, summary = Writer(out), Summary()
        start = time.perf_counter()
        on_ray(bundle, settings, None, "local", actors)(reqs, writer, summary)  # type: ignore[arg-type]
        ray_s = time.perf_counter() - start
        writer.close()
        answers = _answers(out)
    return {"ray_actors": actors, "ray_s": ray_s, "ray_req_s": len(reqs) / ray_s, "ray_failed": summary.failed,
            "ray_same_as_loop": sum(answers.get(f"r{i}") == text for i, text in enumerate(loop)),
            "ray_same_as_batch": sum(answers.get(k) == v for k, v in local.items())}  # fmt: skip


def _answers(path: Path) -> dict[str, str]:
    import json

    return {(d := json.loads(raw))["custom_id"]: d["response"]["body"]["choices"][0]["message"]["content"]
            for raw in path.read_text().splitlines()}  # fmt: skip


def batch_markdown(result: dict) -> str:
    b, m = result["batch"], result["machine"]
    cols = [("loop of Pipeline.generate", "loop"), ("qwen3vl-onnx batch", "batch")]
    if "ray_s" in b:
        cols.append((f"batch --ray local, {b['ray_actors']} actors (Ray start and loads included)", "ray"))
    rows = [
        "| | " + " | ".join(name for name, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| requests/s | " + " | ".join(f"{b[k + '_req_s']:.3f}" for _, k in cols) + " |",
        "| total (s) | " + " | ".join(f"{b[k + '_s']:.1f}" for _, k in cols) + " |",
    ]
    text = (f"{b['requests']} requests, a {b['picture']}x{b['picture']} picture and {b['tokens']} greedy tokens each, "
            f"--parallel {b['parallel']}: batch {b['ratio']:.2f}x the loop's requests/s; {b['same_answers']}/{b['requests']} "
            "answers the same text as the loop's.")  # fmt: skip
    if "ray_s" in b:
        text += (f" On Ray: {b['ray_same_as_batch']}/{b['requests']} answers the same text as the local batch run's, "
                 f"{b['ray_same_as_loop']}/{b['requests']} as the loop's, {b['ray_failed']} failed.")  # fmt: skip
    flags = " ".join(m.get("cpu_flags", []))
    text += f" Machine: {m['cpu']}, {m['cores']} cores, CPU flags: {flags}, onnxruntime {m['onnxruntime']}."
    return "\n".join(rows) + "\n\n" + text + "\n"
