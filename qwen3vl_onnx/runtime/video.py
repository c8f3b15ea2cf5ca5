"""Qwen3-VL video preprocessing in numpy + Pillow, as transformers' ``Qwen3VLVideoProcessor`` and
``Qwen3VLProcessor`` do it, configured by the checkpoint's ``video_preprocessor_config.json``.

A video file is sampled at ``fps`` (default the config's, 2): ``int(frames / video_fps * fps)``
frames clamped to [min_frames, max_frames] and to the frame total, at ``linspace(...).round()``.
All frames get one size from the video ``smart_resize`` over the whole clip's pixel budget, with
the per-frame cap transformers calls ``cap_pixels_per_frame`` (qwen-vl-utils' behaviour, on unless
the config says otherwise). The last frame is repeated to fill the temporal patch. Each temporal
patch becomes ``<{t:.1f} seconds><|vision_start|>pads<|vision_end|>`` in the prompt (prompt.py),
``t`` the mean time of its two frames, in place of the template's own markers around the video.

Only the sampled frames are decoded and kept, each resized as it arrives (video_decode.py), so a
long video never holds its full-size frames in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from .preprocess import ImageLike, load_image, to_rgb
from .video_decode import VideoFile, probe, read_frames

# A frame list larger than this is refused (it would be sampled, not shown frame by frame).
FRAME_PIXEL_LIMIT = 2 * 89_478_485


@dataclass(frozen=True)
class VideoProcessorConfig:
    """The checkpoint's video processor settings; absent keys take transformers' defaults."""

    min_pixels: int = 128 * 32 * 32  # the clip's pixel floor over all frames (size.shortest_edge)
    max_pixels: int = 768 * 32 * 32  # the clip's pixel budget over all frames (size.longest_edge)
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = True
    max_video_tokens: int = 768  # per-frame ceiling of the cap, in merged tokens' pixel area (factor**2 each)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoProcessorConfig:
        size = d.get("size") or {}
        known = {f.name for f in fields(cls)} - {"min_pixels", "max_pixels", "cap_pixels_per_frame"}
        kw: dict[str, Any] = {k: d[k] for k in known if d.get(k) is not None}
        for k in ("image_mean", "image_std"):
            if k in kw:
                kw[k] = tuple(float(x) for x in kw[k])
        kw["min_pixels"] = int(size.get("shortest_edge", d.get("min_pixels", cls.min_pixels)))
        kw["max_pixels"] = int(size.get("longest_edge", d.get("max_pixels", cls.max_pixels)))
        if d.get("cap_pixels_per_frame") is not None:
            kw["cap_pixels_per_frame"] = bool(d["cap_pixels_per_frame"])
        return cls(**kw)

    @classmethod
    def from_file(cls, path: Path) -> VideoProcessorConfig | None:
        """The config in ``path``, or None when the checkpoint ships none (it does not take video)."""
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class VideoRequest:
    """One video of a message: a file (path or bytes) or a list of frames, and per-video options.

    ``fps`` samples a file at that rate; for a frame list it says at what rate the frames were
    taken (for their timestamps). ``max_frames`` and ``max_pixels`` (per frame) lower the config's
    limits; ``start``/``end`` (seconds) cut a file to a clip.
    """

    source: VideoFile | Sequence[ImageLike]
    fps: float | None = None
    max_frames: int | None = None
    max_pixels: int | None = None
    start: float | None = None
    end: float | None = None

    def checked(self, cfg: VideoProcessorConfig) -> VideoRequest:
        def number(name: str, kind: type, lo: float, hi: float | None = None) -> None:
            v = getattr(self, name)
            if v is None:
                return
            ok = isinstance(v, int | float) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
            if not ok or not math.isfinite(v) or v < lo or (hi is not None and v > hi):
                bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
                raise UserError(f"video {name} must be {'an integer' if kind is int else 'a number'} {bound}, got {v!r}")

        number("fps", float, 1e-3, 1000)
        number("max_frames", int, 1, cfg.max_frames)
        number("max_pixels", int, cfg.factor**2)
        number("start", float, 0)
        number("end", float, 0)
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise UserError(f"video end ({self.end}) must come after its start ({self.start})")
        return self


@dataclass
class Video:
    """A preprocessed video: patches, its (t, h, w) grid, the frames it used and their timestamps."""

    pixel_values: np.ndarray
    grid: tuple[int, int, int]
    indices: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)


def sample_indices(total: int, video_fps: float | None, fps: float, min_frames: int, max_frames: int) -> np.ndarray:
    """Frame numbers to use out of ``total`` (transformers' ``sample_frames``; 24 fps when unknown)."""
    n = int(total / (video_fps or 24) * fps)
    n = min(max(n, min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def smart_resize_video(num_frames: int, height: int, width: int, temporal: int, factor: int, min_pixels: int,
                       max_pixels: int) -> tuple[int, int]:  # fmt: skip
    """Frame size for a clip: sides multiples of ``factor``, the clip's pixels within the budget."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise UserError(f"video frames of size {width}x{height} have an aspect ratio over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(num_frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def frame_size(num_frames: int, height: int, width: int, cfg: VideoProcessorConfig,
               max_pixels: int | None = None) -> tuple[int, int]:  # fmt: skip
    """The size every frame of a ``num_frames`` clip is resized to (``max_pixels``: a per-frame cap)."""
    n = max(num_frames, cfg.temporal_patch_size)  # one frame is repeated to a full temporal patch
    budget = cfg.max_pixels
    if cfg.cap_pixels_per_frame or max_pixels is not None:
        frame_cap = cfg.max_video_tokens * cfg.factor**2 if cfg.cap_pixels_per_frame else cfg.max_pixels
        if max_pixels is not None:
            frame_cap = min(frame_cap, max_pixels)
        floor = int(cfg.min_pixels * 1.05) if max_pixels is None else min(int(cfg.min_pixels * 1.05), max_pixels)
        budget = max(min(frame_cap, cfg.max_pixels // n), floor) * n
    return smart_resize_video(n, height, width, cfg.temporal_patch_size, cfg.factor, cfg.min_pixels, budget)


def timestamps(indices: Sequence[int], fps: float, temporal: int) -> list[float]:
    """Seconds of each temporal patch: the mean time of its first and last frame."""
    idx = list(indices)
    idx += [idx[-1]] * (-len(idx) % temporal)
    return [(idx[i] / fps + idx[i + temporal - 1] / fps) / 2 for i in range(0, len(idx), temporal)]


def patchify_video(frames: np.ndarray, cfg: VideoProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, H, W, 3) uint8 frames of one size -> normalised patches (t*h*w, 3*tp*p*p) and the grid."""
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -len(frames) % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    t, height, width = len(frames) // tp, frames.shape[1], frames.shape[2]
    gh, gw = height // p, width // p
    out = np.empty((t, gh // m, gw // m, m, m, 3, tp, p, p), np.float32)
    mean = np.asarray(cfg.image_mean, np.float32)[:, None, None, None]
    std = np.asarray(cfg.image_std, np.float32)[:, None, None, None]
    for j in range(t):  # one temporal patch at a time: the float copy of the whole clip never exists twice
        x = frames[j * tp : (j + 1) * tp].transpose(3, 0, 1, 2).astype(np.float32) * np.float32(cfg.rescale_factor)
        x = (x - mean) / std  # (3, tp, H, W)
        x = x.reshape(3, tp, gh // m, m, p, gw // m, m, p)
        out[j] = x.transpose(2, 5, 3, 6, 0, 1, 4, 7)
    return out.reshape(t * gh * gw, 3 * tp * p * p), (t, gh, gw)


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic (antialiased when shrinking), rows first, then columns, rounding to uint8 between the
    passes: the order torchvision's uint8 resize (transformers' video path) takes. Pillow's one-call
    resize may take the other order, which differs by up to 14 levels near sharp edges when one
    side grows and the other shrinks (bicubic overshoot clipped at a different pass)."""
    h, w = size
    img = Image.fromarray(rgb)
    if img.width != w:
        img = img.resize((w, img.height), resample=Image.Resampling.BICUBIC)
    if img.height != h:
        img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.asarray(img)


def _frame_list(req: VideoRequest, cfg: VideoProcessorConfig) -> Video:
    frames = list(req.source)  # type: ignore[arg-type]
    if not frames:
        raise UserError("video frame list is empty")
    limit = req.max_frames or cfg.max_frames
    if len(frames) > limit:
        raise UserError(f"video has {len(frames)} frames, the limit is {limit}")
    rgbs = [to_rgb(load_image(f)) for f in frames]
    shapes = {r.shape for r in rgbs}
    if len(shapes) != 1:
        raise UserError(f"video frames differ in size: {sorted((s[1], s[0]) for s in shapes)}")
    height, width = rgbs[0].shape[:2]
    if height * width > FRAME_PIXEL_LIMIT:
        raise UserError(f"video frames of {width}x{height} are over {FRAME_PIXEL_LIMIT / 1e6:.0f} million pixels")
    size = frame_size(len(rgbs), height, width, cfg, req.max_pixels)
    pixels, grid = patchify_video(np.stack([_resize(r, size) for r in rgbs]), cfg)
    idx = list(range(len(rgbs)))
    return Video(pixels, grid, idx, timestamps(idx, req.fps or cfg.fps, cfg.temporal_patch_size))


def _clip(req: VideoRequest, total: int, fps: float | None, name: str) -> tuple[int, int]:
    """First frame and frame count of the requested clip ([start, end] seconds, whole video by default)."""
    if req.start is None and req.end is None:
        return 0, total
    rate = fps or 24
    first = 0 if req.start is None else math.ceil(req.start * rate - 1e-6)
    last = total - 1 if req.end is None else min(total - 1, math.floor(req.end * rate + 1e-6))
    if first > last:
        raise UserError(f"{name}: no frames between {req.start or 0}s and {req.end or total / rate:g}s "
                        f"(the video lasts {total / rate:.2f}s)")  # fmt: skip
    return first, last - first + 1


def _file(req: VideoRequest, cfg: VideoProcessorConfig) -> Video:
    source: VideoFile = req.source  # type: ignore[assignment]
    info = probe(source)
    name = "video data" if isinstance(source, bytes) else str(source)
    if info.width * info.height > FRAME_PIXEL_LIMIT:
        raise UserError(f"{name}: frames of {info.width}x{info.height} are over {FRAME_PIXEL_LIMIT / 1e6:.0f} million pixels")
    first, total = _clip(req, info.total_frames, info.fps, name)
    rel = sample_indices(total, info.fps, req.fps or cfg.fps, cfg.min_frames, req.max_frames or cfg.max_frames)
    indices = [first + int(i) for i in rel]
    h, w = frame_size(len(indices), info.height, info.width, cfg, req.max_pixels)
    frames = np.empty((len(indices), h, w, 3), np.uint8)
    read_frames(source, indices, info.fps, lambda k, rgb: frames.__setitem__(k, _resize(rgb, (h, w))))
    pixels, grid = patchify_video(frames, cfg)
    return Video(pixels, grid, indices, timestamps(indices, info.fps or 24, cfg.temporal_patch_size))


def preprocess_video(req: VideoRequest, cfg: VideoProcessorConfig) -> Video:
    """Sample, decode, resize, normalise and patchify one video."""
    req = req.checked(cfg)
    if isinstance(req.source, str | Path | bytes):
        return _file(req, cfg)
    if isinstance(req.source, np.ndarray) and req.source.ndim == 4:
        return _frame_list(VideoRequest(list(req.source), req.fps, req.max_frames, req.max_pixels), cfg)
    if isinstance(req.source, Sequence):
        return _frame_list(req, cfg)
    raise UserError(f"video must be a path, a data URL or a list of frames, got {type(req.source).__name__}")
