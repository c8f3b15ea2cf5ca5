"""KV cache ranges measured by running a bundle on calibration conversations.

The int8 KV cache needs a static scale per (layer, kv head, channel) before any request is seen.
They are measured, not guessed: the bundle's float-cache decoder runs a few conversations that
cover what the cache will hold (prose, code, another script, a long text, pictures of different
kinds, a short video, a second turn), each ending in an assistant's answer so answer positions are
seen too, and the largest |key| and |value| of every channel is kept. ``export`` calls this on the
bundle it is writing, so it sits above both the exporter and the runtime.

The decoder runs a few layers at a time (``export.segments``): every prompt goes through one run
of layers, its hidden states are kept, then the next run's weights replace the last's. The answers
are written out rather than generated because no logits exist until the last layer has run; a
session holds at most ``SEGMENT_BYTES`` of weights, so measuring stays within the memory that
streaming the export takes, at any depth.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from . import graph_io as io
from .export.segments import Segment, segments
from .runtime.cache import KVCache
from .runtime.model import BundleModel, bind_cache, open_session
from .runtime.pipeline import Pipeline
from .runtime.positions import rope_index

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
# Each conversation's last turn: the assistant's answer, read as part of the prompt.
ANSWER = (
    "There are three shapes: a red circle at the top left, a blue square in the middle and a green "
    "triangle below it. The total is 4,512.07, about 4,151.10 euros; here it is as JSON: "
    '{"total": 4512.07, "eur": 4151.1}. 总之，图中有三个形状。'
)
# Weight bytes of decoder layers one calibration session holds at a time (the head is never
# loaded). Dense decoders up to 4B int4 take one or two sessions; a 30B-A3B int4 decoder's layers
# (0.335 GB each) take eight runs of six, keeping the peak under the export's own (~4 GB).
SEGMENT_BYTES = 2 << 30


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


def _prompt_feeds(pipe: Pipeline, messages: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The decoder's inputs for ``messages`` followed by ``ANSWER``, run as one prompt into an empty cache."""
    m, cfg = pipe.model, pipe.config
    p = pipe.prepare([*messages, {"role": "assistant", "content": ANSWER}], add_generation_prompt=False)
    emb, ds = m.encode_images(p.pixel_values, p.grids) if p.pixel_values is not None else (None, None)
    pos, _ = rope_index(p.ids, cfg.image_token_id, cfg.video_token_id, p.image_grids, p.video_grids,
                        cfg.vision.spatial_merge_size, 0)  # fmt: skip
    embeds, visual_index, deepstack = m.prefill_inputs(p.ids, emb, ds)
    n = len(p.ids)
    feeds = m.feeds(embeds, pos[:, None, :], visual_index, deepstack)
    return {**feeds, io.SEQLENS_K: np.array([n - 1], np.int32), io.TOTAL_SEQUENCE_LENGTH: np.array(n, np.int32)}


def _segment_session(bundle: Path, seg: Segment) -> ort.InferenceSession:
    """A session of ``seg``'s graph, saved beside the decoder so it finds the weight file, then removed."""
    path = bundle / f".calibration-layers-{seg.first}-{seg.stop}.onnx"
    try:
        onnx.save(seg.model, path)
        return open_session(path, None, None)
    finally:
        path.unlink(missing_ok=True)


def kv_ranges(bundle: Path, segment_bytes: int = SEGMENT_BYTES) -> np.ndarray:
    """Largest |key| and |value| per (layer, kv head, channel) over the calibration conversations:
    (layers, 2, kv_heads, head_dim) float32, measured with the bundle's float cache, at most
    ``segment_bytes`` of decoder weights loaded at a time."""
    pipe = Pipeline(BundleModel(bundle, kv_cache="fp32", decoder_graph=False))
    m, t = pipe.model, pipe.config.text
    prompts = [_prompt_feeds(pipe, c) for c in conversations(pipe.processors.video is not None)]
    m.vision = None  # its memory back before the decoder's layers load
    graph = onnx.load(bundle / m.manifest["graphs"]["decoder"]["file"], load_external_data=False)
    ranges = np.zeros((t.num_hidden_layers, 2, t.num_key_value_heads, t.head_dim), np.float32)
    carried = [{io.INPUTS_EMBEDS: p[io.INPUTS_EMBEDS]} for p in prompts]  # the residual stream per prompt
    runs = segments(graph, t.num_hidden_layers, segment_bytes)
    for seg in runs:
        if len(runs) > 1:  # a large model's calibration takes minutes: say where it is
            print(f"  layers {seg.first}-{seg.stop - 1} of {t.num_hidden_layers}", file=sys.stderr)
        session = _segment_session(bundle, seg)
        takes = {i.name for i in session.get_inputs()}
        for feeds, carry in zip(prompts, carried, strict=True):
            n = int(feeds[io.TOTAL_SEQUENCE_LENGTH])
            cache = KVCache.empty(seg.stop - seg.first, 1, t.num_key_value_heads, t.head_dim, n, True)
            cache.ensure(n)
            binding = session.io_binding()
            for name, arr in {**feeds, **carry}.items():
                if name in takes:
                    binding.bind_cpu_input(name, arr)
            for name in seg.outputs:
                binding.bind_output(name, "cpu")
            bind_cache(binding, cache, seg.first)
            session.run_with_iobinding(binding)
            out = binding.get_outputs()[: len(seg.outputs)]  # bound first; the presents are the cache
            carry.clear()
            carry.update((name, v.numpy()) for name, v in zip(seg.outputs, out, strict=True))
            for j, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
                ranges[seg.first + j, 0] = np.maximum(ranges[seg.first + j, 0], np.abs(k[0, :, :n]).max(axis=1))
                ranges[seg.first + j, 1] = np.maximum(ranges[seg.first + j, 1], np.abs(v[0, :, :n]).max(axis=1))
        del session
    return ranges
