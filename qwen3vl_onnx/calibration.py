"""The int8 KV cache measured by running a bundle on calibration conversations: its ranges, then its agreement.

The int8 KV cache needs a static scale per (layer, kv head, channel) before any request is seen.
They are measured, not guessed: the bundle's float-cache decoder runs a few conversations that
cover what the cache will hold (prose, code, another script, a long text, pictures of different
kinds, a short video, a second turn), each ending in an assistant's answer so answer positions are
seen too, and the largest |key| and |value| of every channel is kept. Once the int8-cache graph is
written from them, the same conversations run through it and its logits at the last answer
positions are compared with the float cache's: ``export`` makes int8 the default only where they
agree (``export.kv_int8.AGREEMENT_BAR``). ``export`` calls this on the bundle it is writing, so it
sits above both the exporter and the runtime.

The decoder runs a few layers at a time (``export.segments``): every prompt goes through one run
of layers, its hidden states are kept, then the next run's weights replace the last's. The answers
are written out rather than generated because no logits exist until the last layer has run; a
session holds at most ``SEGMENT_BYTES`` of weights, so measuring stays within the memory that
streaming the export takes, at any depth.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from . import graph_io as io
from .config import Qwen3VLConfig
from .export.segments import Segment, head, segments
from .runtime.cache import KVCache
from .runtime.model import BundleModel, bind_cache, open_session, read_manifest
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
# Weight bytes of decoder layers one calibration session holds at a time (the head, final norm and
# lm_head, is a session of its own, after the layers). Dense decoders up to 4B int4 take one or two
# sessions; a 30B-A3B int4 decoder's layers (0.335 GB each) take eight runs of six, keeping the
# peak under the export's own (~4 GB).
SEGMENT_BYTES = 2 << 30
# Answer positions per conversation whose logits the int8 cache's agreement check compares.
KEEP = 8
Feeds = dict[str, np.ndarray]  # a decoder call's inputs (or the residual stream it carries) by name


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


def _prompt_feeds(pipe: Pipeline, messages: list[dict[str, Any]]) -> Feeds:
    """The decoder's inputs for ``messages`` followed by ``ANSWER``, run as one prompt into an empty
    cache, keeping the logits of the answer's last ``KEEP`` positions."""
    m, cfg = pipe.model, pipe.config
    p = pipe.prepare([*messages, {"role": "assistant", "content": ANSWER}], add_generation_prompt=False)
    emb, ds = m.encode_images(p.pixel_values, p.grids) if p.pixel_values is not None else (None, None)
    pos, _ = rope_index(p.ids, cfg.image_token_id, cfg.video_token_id, p.image_grids, p.video_grids,
                        cfg.vision.spatial_merge_size, 0)  # fmt: skip
    embeds, visual_index, deepstack = m.prefill_inputs(p.ids, emb, ds)
    n = len(p.ids)
    feeds = m.feeds(embeds, pos[:, None, :], visual_index, deepstack, KEEP)
    return {**feeds, io.SEQLENS_K: np.array([n - 1], np.int32), io.TOTAL_SEQUENCE_LENGTH: np.array(n, np.int32)}


def _session(bundle: Path, model: onnx.ModelProto, name: str) -> ort.InferenceSession:
    """A session of a graph cut from the decoder, saved beside it so it finds the weight file, then removed."""
    path = bundle / f".calibration-{name}.onnx"
    try:
        onnx.save(model, path)
        return open_session(path, None, None)
    finally:
        path.unlink(missing_ok=True)


def _segment_cache(seg: Segment, kv_heads: int, head_dim: int, n: int) -> KVCache:
    """An empty cache for ``seg``'s layers, each of the element type its graph keeps (int8 or float)."""
    kinds = {v.name: v.type.tensor_type.elem_type for v in seg.model.graph.input}
    dtypes = [np.int8 if kinds[io.past_key(i)] == onnx.TensorProto.INT8 else np.float32 for i in range(seg.first, seg.stop)]
    cache = KVCache.empty(seg.stop - seg.first, 1, kv_heads, head_dim, n, True, dtypes)
    cache.ensure(n)
    return cache


def _run_layers(bundle: Path, graph_file: str, prompts: list[Feeds], segment_bytes: int,
                seen: Callable[[int, np.ndarray, np.ndarray, int], None] | None = None) -> list[Feeds]:  # fmt: skip
    """Every prompt through all decoder layers of ``graph_file``, ``segment_bytes`` of weights at a
    time; ``seen(layer, keys, values, n)`` gets each layer's cache after each prompt. Returns, per
    prompt, the residual stream entering the final norm."""
    t = Qwen3VLConfig.from_manifest(read_manifest(bundle)["config"]).text
    graph = onnx.load(bundle / graph_file, load_external_data=False)
    carried = [{io.INPUTS_EMBEDS: p[io.INPUTS_EMBEDS]} for p in prompts]  # the residual stream per prompt
    runs = segments(graph, t.num_hidden_layers, segment_bytes)
    for seg in runs:
        if len(runs) > 1:  # a large model's calibration takes minutes: say where it is
            print(f"  layers {seg.first}-{seg.stop - 1} of {t.num_hidden_layers}", file=sys.stderr)
        session = _session(bundle, seg.model, f"layers-{seg.first}-{seg.stop}")
        takes = {i.name for i in session.get_inputs()}
        for feeds, carry in zip(prompts, carried, strict=True):
            n = int(feeds[io.TOTAL_SEQUENCE_LENGTH])
            cache = _segment_cache(seg, t.num_key_value_heads, t.head_dim, n)
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
            if seen is not None:
                for j, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
                    seen(seg.first + j, k[0], v[0], n)
        del session
    return carried


def _logits(bundle: Path, prompts: list[Feeds], finals: list[Feeds]) -> list[np.ndarray]:
    """Each prompt's last ``KEEP`` logits from its final residual stream, through the bundle's head alone."""
    graph = onnx.load(bundle / read_manifest(bundle)["graphs"]["decoder"]["file"], load_external_data=False)
    session = _session(bundle, head(graph), "head")
    takes = {i.name for i in session.get_inputs()}
    return [session.run([io.LOGITS], {k: v for k, v in {**feeds, **final}.items() if k in takes})[0][0]
            for feeds, final in zip(prompts, finals, strict=True)]  # fmt: skip


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over positions of the cosine between two (positions, vocab) logit arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


class Calibrator:
    """What an int8 KV cache export measures on the bundle it is writing: the cache's ranges over
    the calibration conversations (float cache), then how closely the int8 cache built from them
    reproduces the float cache's logits on the same conversations.

    One object per export: ``agreement`` compares against the logits ``ranges`` kept, so the float
    decoder runs once. Both run the decoder a few layers at a time (``segment_bytes`` of weights).
    """

    def __init__(self, segment_bytes: int = SEGMENT_BYTES):
        self.segment_bytes = segment_bytes
        self.prompts: list[Feeds] = []  # the conversations' decoder inputs
        self.reference: list[np.ndarray] = []  # their float-cache logits, (KEEP, vocab) each

    def ranges(self, bundle: Path) -> np.ndarray:
        """Largest |key| and |value| per (layer, kv head, channel): (layers, 2, kv_heads, head_dim) float32."""
        pipe = Pipeline(BundleModel(bundle, kv_cache="fp32", decoder_graph=False))
        t = pipe.config.text
        self.prompts = [_prompt_feeds(pipe, c) for c in conversations(pipe.processors.video is not None)]
        del pipe  # the vision tower's memory back before the decoder's layers load
        ranges = np.zeros((t.num_hidden_layers, 2, t.num_key_value_heads, t.head_dim), np.float32)

        def seen(layer: int, k: np.ndarray, v: np.ndarray, n: int) -> None:
            np.maximum(ranges[layer, 0], np.abs(k[:, :n]).max(axis=1), out=ranges[layer, 0])
            np.maximum(ranges[layer, 1], np.abs(v[:, :n]).max(axis=1), out=ranges[layer, 1])

        graph_file = read_manifest(bundle)["graphs"]["decoder"]["file"]
        finals = _run_layers(bundle, graph_file, self.prompts, self.segment_bytes, seen)
        self.reference = _logits(bundle, self.prompts, finals)
        return ranges

    def agreement(self, bundle: Path, graph_file: str) -> list[float]:
        """Per calibration conversation, the mean logit cosine over its last ``KEEP`` positions of
        the int8-cache decoder ``graph_file`` against the float cache (call after ``ranges``)."""
        if not self.reference:
            raise RuntimeError("Calibrator.agreement needs the float cache's logits: call ranges first")
        finals = _run_layers(bundle, graph_file, self.prompts, self.segment_bytes)
        got = _logits(bundle, self.prompts, finals)
        return [_cosine(a, b) for a, b in zip(got, self.reference, strict=True)]
