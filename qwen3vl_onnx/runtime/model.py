"""Load a bundle and run its graphs: vision encode, embedding lookup, decoder steps with a KV cache.

This layer knows tensors, not chat: it is what ``verify`` and the parity tests drive directly, and
what :mod:`qwen3vl_onnx.runtime.generate` builds the user-facing pipeline on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .. import graph_io as io
from ..config import BUNDLE_FORMAT_VERSION, Qwen3VLConfig
from ..errors import UserError
from .cache import KVCache
from .positions import rope_index
from .token_table import TokenTable
from .vision_geometry import Grid, vision_calls, vision_inputs

# Calls of at least this many tokens go to a bundle's prefill graph (--prefill-int8). Below it the
# compact graph wins, as it reads half the weight bytes (crossover measured at the 4B shape).
PREFILL_GRAPH_MIN_TOKENS = 8

# A long prompt (a video is thousands of tokens) is prefilled in chunks so attention's score matrix
# stays within this many bytes; each chunk re-reads the weights, so chunks stay at least this long.
PREFILL_SCORES_BYTES = 1 << 30
PREFILL_MIN_CHUNK = 512
# Vision calls carry at most this many patches (frames are split across calls; each frame attends
# only to itself, so the features do not change): a 60 s video's activations never exist at once.
VISION_MAX_PATCHES = 16384
# KV cache precisions: the manifest key suffix of their decoder graphs, and their buffers' dtype.
KV_GRAPH_SUFFIX = {"fp32": "", "int8": "_int8kv"}
CACHE_DTYPES: dict[str, type[np.generic]] = {"fp32": np.float32, "int8": np.int8}


def open_session(path: Path, providers: Sequence[str] | None, threads: int | None,
                 profile_prefix: Path | None = None) -> ort.InferenceSession:  # fmt: skip
    """An ONNX Runtime session without the CPU memory arena (``profile_prefix``: with ONNX Runtime's
    per-node profiler on, writing there; ``bench --profile`` times the runtime's own sessions).

    Why no arena: it keeps every activation buffer it ever handed out (~0.1 GB per session after
    an 896x896 image), at no measurable speed gain.
    """
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    if threads:
        opts.intra_op_num_threads = threads
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    opts.log_severity_level = 3
    avail = ort.get_available_providers()
    chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in avail] or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
    except Exception as e:
        raise UserError(f"{path}: cannot load graph ({str(e).splitlines()[0][:200]})") from None


def bind_cache(binding: ort.IOBinding, cache: KVCache, first_layer: int = 0) -> None:
    """``cache``'s buffers as both past and present of layers ``first_layer`` on: the graph writes
    each call's keys and values in place at each row's ``seqlens_k``, so nothing is copied."""
    for i, (k, v) in enumerate(cache.bindings(), first_layer):
        binding.bind_ortvalue_input(io.past_key(i), k)
        binding.bind_ortvalue_input(io.past_value(i), v)
        binding.bind_ortvalue_output(io.present_key(i), k)
        binding.bind_ortvalue_output(io.present_value(i), v)


def read_manifest(path: Path) -> dict[str, Any]:
    """The bundle's ``manifest.json``, checked enough that reading it later cannot fail: a missing,
    unreadable, damaged or older manifest is a one-line error naming the bundle."""
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"{path}: not a bundle (manifest.json is missing)")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (OSError, ValueError) as e:
        why = str(e).splitlines()[0][:120]
        raise UserError(f"{mpath}: not a readable manifest ({why}); export the checkpoint again") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{mpath}: not a bundle manifest (a JSON {type(manifest).__name__}, not an object)")
    if (found := manifest.get("format_version")) != BUNDLE_FORMAT_VERSION:
        old = "has no format version (an early export)" if found is None else f"is format {found!r}"
        raise UserError(f"{path}: bundle {old}, this version reads format {BUNDLE_FORMAT_VERSION}; export the checkpoint again")
    try:
        Qwen3VLConfig.from_manifest(manifest["config"])
        [str(g["file"]) for g in manifest["graphs"].values()] + [str(manifest["embed_tokens"]["file"])]
        bool(manifest["decoder_options"]["fused"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{mpath}: the manifest is damaged ({type(e).__name__}: {str(e)[:100]}); export the checkpoint again"
                        ) from None  # fmt: skip
    return manifest


def kv_cache_choice(path: Path, manifest: dict[str, Any], asked: str | None) -> str:
    """The cache precision a bundle runs with: ``asked``, or its default; one it lacks is refused
    (the server asks before loading, to size its cache)."""
    have = [kv for kv, suffix in KV_GRAPH_SUFFIX.items() if "decoder" + suffix in manifest["graphs"]]
    kv = asked or manifest.get("kv_cache", {}).get("default", "fp32")
    if kv not in KV_GRAPH_SUFFIX:
        raise UserError(f"--kv-cache {kv!r} is not one of {', '.join(KV_GRAPH_SUFFIX)}")
    if kv not in have:
        raise UserError(f"{path}: this bundle has no {kv} KV cache graphs (it has {', '.join(have)}); "
                        f"export it with --kv-cache {kv}")  # fmt: skip
    return kv


def cache_dtypes(manifest: dict[str, Any], kv: str) -> list[type[np.generic]]:
    """Per layer, the element type of the cache that the bundle's ``kv`` decoder graph keeps, read
    from that graph's inputs in the manifest: an int8-cache graph keeps its first layers float
    (``export.kv_int8.FLOAT_LAYERS`` or more, as its export chose)."""
    layers = Qwen3VLConfig.from_manifest(manifest["config"]).text.num_hidden_layers
    inputs = manifest["graphs"]["decoder" + KV_GRAPH_SUFFIX[kv]]["inputs"]
    return [np.dtype(inputs[io.past_key(i)]["dtype"]).type if io.past_key(i) in inputs else CACHE_DTYPES[kv]
            for i in range(layers)]  # fmt: skip


class BundleModel:
    """The graphs and embedding table of one bundle directory."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 prefill_graph: bool = True, kv_cache: str | None = None, decoder_graph: bool = True):  # fmt: skip
        """``prefill_graph=False`` leaves a --prefill-int8 bundle's prompt graph unloaded (its memory
        back, prompts at the compact graph's speed). ``kv_cache`` "fp32" or "int8" picks the
        decoder graphs of that cache precision (default: the bundle's). ``decoder_graph=False``
        loads no decoder at all (calibration runs it a few layers at a time)."""
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.config = Qwen3VLConfig.from_manifest(self.manifest["config"])
        files = [g["file"] for g in self.manifest["graphs"].values()] + [self.manifest["embed_tokens"]["file"]]
        for f in files:
            if not (self.path / f).is_file():
                raise UserError(f"{self.path}: bundle is incomplete, {f} is missing")
        self.kv_cache = kv_cache_choice(self.path, self.manifest, kv_cache)
        graph = lambda key: self.path / self.manifest["graphs"][key + KV_GRAPH_SUFFIX[self.kv_cache]]["file"]  # noqa: E731
        # The decoder first: each session briefly holds a weight twice while MatMulNBits repacks it,
        # and that peak is lower before the vision tower is resident (4B int4 generate with a picture:
        # peak RSS 1.25x -> 1.20x the bundle; docs/BENCHMARKS.md, "int8 KV cache and one token table").
        self.decoder = open_session(graph("decoder"), providers, threads) if decoder_graph else None
        self.vision = open_session(self.path / "vision.onnx", providers, threads)
        # --prefill-int8 bundles: a second decoder for prompts (same inputs, same cache).
        has_prefill = decoder_graph and prefill_graph and "decoder_prefill" in self.manifest["graphs"]
        self.prefill_decoder = open_session(graph("decoder_prefill"), providers, threads) if has_prefill else None
        self.tokens = TokenTable(self.path, self.manifest["embed_tokens"])
        self.num_deepstack = len(self.config.vision.deepstack_visual_indexes)
        self.fused = bool(self.manifest["decoder_options"]["fused"])

    @property
    def cache_dtypes(self) -> list[type[np.generic]]:
        """Each layer's cache element type (see ``cache_dtypes``)."""
        return cache_dtypes(self.manifest, self.kv_cache)

    def encode_images(self, pixel_values: np.ndarray, grids: Sequence[Grid]) -> tuple[np.ndarray, np.ndarray]:
        """Merged embeddings (M, D) and DeepStack features (K, M, D) for patchified images.

        One vision call per run of consecutive images (or videos) whose frames have the same size,
        so each call attends over unpadded, unmasked blocks; long runs are split between frames.
        """
        grids = [tuple(int(x) for x in g) for g in grids]
        parts, row = [], 0
        for call in vision_calls(grids, VISION_MAX_PATCHES):
            n = sum(t * h * w for t, h, w in call)
            parts.append(self.vision.run(None, vision_inputs(self.config.vision, pixel_values[row : row + n], call)))
            row += n
        if row != len(pixel_values):
            raise ValueError(f"pixel_values has {len(pixel_values)} rows, the grids need {row}")
        if len(parts) == 1:
            return parts[0][0], parts[0][1]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts], axis=1)

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        return self.tokens.rows(ids)

    @property
    def cache_position_bytes(self) -> int:
        """Bytes one cached position of one row takes: keys and values of every layer."""
        t = self.config.text
        return KVCache.position_bytes(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, self.cache_dtypes)

    def cache_bytes(self, batch: int, capacity: int) -> int:
        """What ``new_cache(batch, capacity)`` holds once every position is used."""
        t = self.config.text
        return KVCache.size_bytes(t.num_hidden_layers, batch, t.num_key_value_heads, t.head_dim, capacity, self.cache_dtypes)

    def new_cache(self, batch: int = 1, capacity: int = 256) -> KVCache:
        """An empty cache; fused bundles preallocate ``capacity`` positions per row (grown on demand)."""
        t = self.config.text
        return KVCache.empty(t.num_hidden_layers, batch, t.num_key_value_heads, t.head_dim, capacity, self.fused,
                             self.cache_dtypes)  # fmt: skip

    def forward(
        self,
        embeds: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        visual_index: np.ndarray | None = None,
        deepstack: np.ndarray | None = None,
        logits_to_keep: int = 1,
        new_lengths: np.ndarray | None = None,
    ) -> np.ndarray:
        """Run the decoder on (B, S, D) embeddings at (3, B, S) positions; appends to ``cache`` and
        returns the last ``logits_to_keep`` positions' logits (B, keep, V).

        Each row continues from its own cached length. ``new_lengths`` (B,) says how many of the S
        tokens of each row are real when rows are right-padded; only an empty cache can take padded
        rows (GroupQueryAttention's first-prompt case), and only fused bundles take batch > 1.
        """
        b, s = embeds.shape[:2]
        if b != cache.batch:
            raise ValueError(f"{b} rows of embeddings for a cache of {cache.batch}")
        if new_lengths is None:
            new_lengths = np.full(b, s, np.int64)
        elif cache.length:
            raise ValueError("right-padded rows need an empty cache")
        feeds = self.feeds(embeds, position_ids, visual_index, deepstack, logits_to_keep)
        if self.fused:
            big = s >= PREFILL_GRAPH_MIN_TOKENS and self.prefill_decoder is not None
            return self._forward_shared(self.prefill_decoder if big else self.decoder, feeds, cache, new_lengths)
        if b != 1:
            raise ValueError("portable bundles run one sequence at a time")
        return self._forward_portable(feeds, cache)

    def feeds(self, embeds: np.ndarray, position_ids: np.ndarray, visual_index: np.ndarray | None,
              deepstack: np.ndarray | None, logits_to_keep: int = 1) -> dict[str, np.ndarray]:  # fmt: skip
        """The decoder's inputs other than the cache's: no visual rows when ``visual_index`` is None."""
        if visual_index is None:
            visual_index = np.zeros((0, 2), np.int64)
            deepstack = np.zeros((self.num_deepstack, 0, self.config.text.hidden_size), np.float32)
        return {
            io.INPUTS_EMBEDS: np.ascontiguousarray(embeds, dtype=np.float32),
            io.POSITION_IDS: np.ascontiguousarray(position_ids, dtype=np.int64),
            io.VISUAL_INDEX: visual_index,
            io.DEEPSTACK_EMBEDS: deepstack,
            io.LOGITS_TO_KEEP: np.array([logits_to_keep], np.int64),
        }

    def _forward_portable(self, feeds: dict[str, np.ndarray], cache: KVCache) -> np.ndarray:
        """Standard-ONNX attention: past in, concatenated present out (batch 1)."""
        for i, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
            feeds[io.past_key(i)] = k
            feeds[io.past_value(i)] = v
        out = self.decoder.run(None, feeds)
        n = self.config.text.num_hidden_layers
        res = dict(zip((o.name for o in self.decoder.get_outputs()), out, strict=True))
        cache.keys = [res[io.present_key(i)] for i in range(n)]
        cache.values = [res[io.present_value(i)] for i in range(n)]
        cache.lengths += feeds[io.INPUTS_EMBEDS].shape[1]
        return res[io.LOGITS]

    def _forward_shared(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], cache: KVCache,
                        new_lengths: np.ndarray) -> np.ndarray:  # fmt: skip
        """One decoder call with the cache buffers bound as both past and present (written in place at
        each row's ``seqlens_k``); the prefill and decode graphs share the buffers, so switching
        between them copies nothing."""
        total = int(cache.lengths.max()) + feeds[io.INPUTS_EMBEDS].shape[1]  # the longest row after this call
        cache.ensure(total)
        totals = cache.lengths + new_lengths
        feeds[io.SEQLENS_K] = (totals - 1).astype(np.int32)
        feeds[io.TOTAL_SEQUENCE_LENGTH] = np.array(total, np.int32)
        binding = session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        binding.bind_output(io.LOGITS, "cpu")
        bind_cache(binding, cache)
        session.run_with_iobinding(binding)
        cache.lengths[:] = totals
        return binding.get_outputs()[0].numpy()

    def prefill(self, ids: Sequence[int], image_embeds: np.ndarray | None, deepstack: np.ndarray | None,
                grids: Sequence[Grid], cache: KVCache, logits_to_keep: int = 1,
                video_grids: Sequence[Grid] = ()) -> np.ndarray:  # fmt: skip
        """Run a prompt, or the continuation of one, on a batch-1 cache (visual features already
        encoded, images' and videos' rows in prompt order; ``grids`` the images', ``video_grids``
        the videos'): positions start where the cache's row ends, and its MRoPE delta grows by the
        pictures' compression. Long prompts run in chunks (``prefill_chunk``). Returns the logits
        of the last ``logits_to_keep`` positions (1, keep, V)."""
        *_, logits = self.prefill_steps(ids, image_embeds, deepstack, grids, cache, logits_to_keep, video_grids)
        assert logits is not None
        return logits

    def prefill_steps(self, ids: Sequence[int], image_embeds: np.ndarray | None, deepstack: np.ndarray | None,
                      grids: Sequence[Grid], cache: KVCache, logits_to_keep: int = 1, video_grids: Sequence[Grid] = (),
                      chunk: int | Callable[[], int] | None = None) -> Iterator[np.ndarray | None]:  # fmt: skip
        """``prefill`` one chunk per step: yields None after each chunk but the last, then the
        logits; a server interleaves other rows' decode steps between them (``chunk``: tokens per
        call, or a function asked before each call). Chunks may cut through an image's pads
        (positions are computed once for the whole input)."""
        if cache.batch != 1:
            raise ValueError("prefill takes a batch-1 cache (a row view of a batch: KVCache.row)")
        cfg = self.config
        start = int(cache.next_positions()[0])
        pos, delta = rope_index(ids, cfg.image_token_id, cfg.video_token_id, grids, video_grids, cfg.vision.spatial_merge_size,
                                start)  # fmt: skip
        embeds, visual_index, ds = self.prefill_inputs(ids, image_embeds, deepstack)
        n = len(ids)
        size = chunk if callable(chunk) else (lambda: chunk or n)
        kept, a = [], 0
        while a < n:
            b = min(n, a + max(1, min(size(), self.prefill_chunk(cache.length + n - a))))
            keep = min(b - a, min(logits_to_keep, n) - (n - b))  # asked-for positions in this chunk
            vi, dsc = visual_index, ds
            if visual_index is not None and (a or b < n):
                rows = (visual_index[:, 1] >= a) & (visual_index[:, 1] < b)
                vi, dsc = visual_index[rows] - np.array([0, a]), ds[:, rows]  # type: ignore[index]
            logits = self.forward(embeds[:, a:b], pos[:, None, a:b], cache, vi, dsc, max(keep, 1))
            if keep > 0:
                kept.append(logits[:, -keep:])
            if b < n:
                yield None
            a = b
        cache.rope_deltas[0] += delta
        yield kept[0] if len(kept) == 1 else np.concatenate(kept, axis=1)

    def prefill_chunk(self, total: int) -> int:
        """Prompt tokens per decoder call when the cache will hold ``total`` positions: as many as
        keep attention's score matrix (heads x chunk x total floats, which ONNX Runtime's CPU
        attention materialises) within ``PREFILL_SCORES_BYTES``, at least ``PREFILL_MIN_CHUNK``."""
        per_token = 4 * self.config.text.num_attention_heads * max(total, 1)
        return max(PREFILL_MIN_CHUNK, PREFILL_SCORES_BYTES // per_token)

    def step(self, tokens: Sequence[int] | np.ndarray, cache: KVCache) -> np.ndarray:
        """Decode one token per row (all three MRoPE axes advance together); returns logits (B, V)."""
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        pos = np.broadcast_to(cache.next_positions()[None, :, None], (3, len(tokens), 1))
        return self.forward(self.embed(tokens)[:, None], pos, cache)[:, -1]

    def prefill_inputs(
        self, ids: Sequence[int], image_embeds: np.ndarray | None, deepstack: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Embeddings with image features in the image/video-pad rows, plus DeepStack row indices."""
        cfg = self.config
        ids_arr = np.asarray(ids, dtype=np.int64)
        embeds = self.embed(ids_arr)
        pads = np.flatnonzero((ids_arr == cfg.image_token_id) | (ids_arr == cfg.video_token_id))
        if image_embeds is None:
            if len(pads):
                raise UserError(f"prompt has {len(pads)} image pad tokens but no images were given")
            return embeds[None], None, None
        if len(pads) != len(image_embeds):
            raise UserError(f"prompt has {len(pads)} image pad tokens but the images give {len(image_embeds)} features")
        embeds[pads] = image_embeds
        visual_index = np.stack([np.zeros_like(pads), pads], axis=1)
        return embeds[None], visual_index, deepstack
