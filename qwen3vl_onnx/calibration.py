"""KV cache ranges measured by running a bundle on calibration conversations.

The int8 KV cache needs a static scale per (layer, kv head, channel) before any request is seen.
They are measured, not guessed: the bundle's float-cache decoder runs a few conversations that
cover what the cache will hold (prose, code, another script, a long text, pictures of different
kinds, a short video, a second turn) plus a few generated tokens each, and the largest |key| and
|value| of every channel is kept. ``export`` calls this on the bundle it is writing, so it sits
above both the exporter and the runtime.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .runtime.model import BundleModel
from .runtime.pipeline import Pipeline

TEXTS = (
    "Describe what you see, then list every object with its colour and where it is in the picture.",
    "def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n"
    "    return out + a + b\n\nExplain the complexity of this function and fix its worst case.",
    "请用中文回答：这张图片里有什么？数一数里面的形状，并说明它们的颜色和位置。",
    "Table 3: 2019 | 4,512.07 | -13.5% | 0x7f3a\nSum the second column, convert it to euros at 0.92 and reply as JSON.",
)
LONG_TEXT = (
    "The committee met on a grey morning to read the report on the river, its floods and the two bridges that "
    "cross it. Each member had a copy with maps, tables of water levels since 1950 and photographs of the banks. "
) * 12
GENERATED = 12  # tokens decoded after each prompt, so answers' keys and values are seen too


def _pictures() -> list[Image.Image]:
    """The packaged sample picture, a photo-like smooth scene with noise, and a page of sharp text-like strokes."""
    sample = Image.open(resources.files("qwen3vl_onnx.demo") / "sample.png").convert("RGB")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:336, 0:448] / 336.0
    scene = np.stack([0.5 + 0.4 * np.sin(3 * x + y), 0.4 + 0.3 * np.cos(5 * y), 0.6 - 0.4 * x * y], axis=-1)
    scene = np.clip(scene + rng.normal(0, 0.08, scene.shape), 0, 1)
    page = np.full((256, 384), 250, np.uint8)
    for row in range(12, 244, 20):
        for col in range(16, 368, 9):
            if rng.random() < 0.8:
                page[row : row + 11, col : col + 2 + int(rng.integers(5))] = 20
    return [sample, Image.fromarray((scene * 255).astype(np.uint8)), Image.fromarray(page).convert("RGB")]


def _video() -> list[np.ndarray]:
    """Eight frames of a bright square crossing a gradient."""
    frames = []
    for t in range(8):
        f = np.zeros((192, 256, 3), np.uint8)
        f[..., 0] = np.linspace(30, 200, 256, dtype=np.uint8)
        f[40:100, 20 + 25 * t : 80 + 25 * t] = (240, 240, 60)
        frames.append(f)
    return frames


def conversations(takes_video: bool) -> list[list[dict[str, Any]]]:
    """The calibration conversations (a video one only when the checkpoint takes video)."""
    pics = _pictures()
    image = lambda p: {"type": "image", "image": p}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    convs = [
        [{"role": "user", "content": [image(pics[0]), text(TEXTS[0])]}],
        [{"role": "system", "content": "You are a careful assistant."},
         {"role": "user", "content": [image(pics[1]), image(pics[2]), text(TEXTS[2])]},
         {"role": "assistant", "content": "The first is a blurred landscape, the second a page of text."},
         {"role": "user", "content": TEXTS[3]}],
        [{"role": "user", "content": TEXTS[1]}],
        [{"role": "user", "content": LONG_TEXT + "\nSummarise the report in three sentences."}],
    ]  # fmt: skip
    if takes_video:
        convs.append([{"role": "user", "content": [{"type": "video", "video": _video(), "fps": 2.0}, text(TEXTS[0])]}])
    return convs


def kv_ranges(bundle: Path) -> np.ndarray:
    """Largest |key| and |value| per (layer, kv head, channel) over the calibration conversations:
    (layers, 2, kv_heads, head_dim) float32, measured with the bundle's float cache."""
    pipe = Pipeline(BundleModel(bundle, prefill_graph=False, kv_cache="fp32"))
    m, t = pipe.model, pipe.config.text
    ranges = np.zeros((t.num_hidden_layers, 2, t.num_key_value_heads, t.head_dim), np.float32)
    for messages in conversations(pipe.processors.video is not None):
        p = pipe.prepare(messages)
        emb, ds = m.encode_images(p.pixel_values, p.grids) if p.pixel_values is not None else (None, None)
        cache = m.new_cache(capacity=len(p.ids) + GENERATED)
        logits = m.prefill(p.ids, emb, ds, p.image_grids, cache, video_grids=p.video_grids)[0, -1]
        for _ in range(GENERATED):
            logits = m.step([int(np.argmax(logits))], cache)[0]
        n = int(cache.lengths[0])
        for i, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
            ranges[i, 0] = np.maximum(ranges[i, 0], np.abs(k[0, :, :n]).max(axis=1))
            ranges[i, 1] = np.maximum(ranges[i, 1], np.abs(v[0, :, :n]).max(axis=1))
    return ranges
