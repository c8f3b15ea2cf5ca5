"""Qwen3-VL image preprocessing in numpy + Pillow, matching transformers' PIL image processor.

Steps: RGB conversion (alpha composited on white, grayscale and palette expanded), ``smart_resize``
to multiples of patch*merge within the checkpoint's pixel budget, bicubic resize on uint8, rescale
and normalise with the checkpoint's mean/std, then patches in 2x2 merge order with the single
frame repeated over the temporal patch.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

ImageLike = str | Path | Image.Image | np.ndarray

# Largest image file read, in pixels: Pillow's own refusal threshold (twice the size at which it
# warns of a possible decompression bomb). A photo is resized to the processor's pixel budget
# anyway, so files up to this size are read without Pillow's warning reaching the user; larger
# ones are refused in one line before their pixels are decoded.
MAX_IMAGE_PIXELS = 2 * 89_478_485


@dataclass(frozen=True)
class ImageProcessorConfig:
    min_pixels: int = 65536
    max_pixels: int = 16777216
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        size = d.get("size") or {}
        return cls(
            min_pixels=int(size.get("shortest_edge", d.get("min_pixels", cls.min_pixels))),
            max_pixels=int(size.get("longest_edge", d.get("max_pixels", cls.max_pixels))),
            patch_size=int(d.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(d.get("merge_size", cls.merge_size)),
            image_mean=tuple(d.get("image_mean", cls.image_mean)),  # type: ignore[arg-type]
            image_std=tuple(d.get("image_std", cls.image_std)),  # type: ignore[arg-type]
            rescale_factor=float(d.get("rescale_factor", cls.rescale_factor)),
        )

    @classmethod
    def from_file(cls, path: Path) -> ImageProcessorConfig:
        """The settings in ``path``. A missing file is an incomplete bundle, not a cue for defaults:
        a model trained at another pixel budget would answer differently without a word."""
        if not path.is_file():
            raise UserError(f"{path.parent}: bundle is incomplete, {path.name} is missing; export the checkpoint again")
        try:
            d = json.loads(path.read_bytes())
            return cls.from_dict(d)
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{path}: not a readable image processor config ({str(e).splitlines()[0][:100]})") from None

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest size with both sides multiples of ``factor`` and area within the pixel budget."""
    if min(height, width) < 1:
        raise UserError(f"image of size {width}x{height} is empty")
    if max(height, width) / min(height, width) > 200:
        raise UserError(f"image of size {width}x{height} has an aspect ratio over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def load_image(image: ImageLike) -> Image.Image:
    """Open a path, or accept a PIL image or an (H, W[, C]) uint8 array."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise UserError(f"image array must be uint8, got {arr.dtype}")
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise UserError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
        return Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    path = Path(image).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    return _decode(path, str(path))


def image_from_bytes(data: bytes, name: str = "image data") -> Image.Image:
    """An encoded image (PNG, JPEG...) held in memory, decoded now so a bad one fails here."""
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():  # sizes up to MAX_IMAGE_PIXELS are read on purpose (see there)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
            img.load()
    except Image.DecompressionBombError:
        raise UserError(f"{name}: image has over {MAX_IMAGE_PIXELS / 1e6:.0f} million pixels; downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{name}: cannot read image ({type(e).__name__})") from None
    return img


def to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8; transparency is composited onto white as transformers does."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert("RGB"))


def patchify(image: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(C, H, W) float image -> (patches, C*T*P*P) in merge order, and its (t, h, w) grid."""
    c, height, width = image.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))
    return x.reshape(gh * gw, c * tp * p * p).astype(np.float32), (1, gh, gw)


def preprocess_image(image: ImageLike, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (patches, grid), exactly as the released processor sees it."""
    rgb = to_rgb(load_image(image))
    h, w = smart_resize(rgb.shape[0], rgb.shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), resample=Image.Resampling.BICUBIC))
    x = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return patchify(x.transpose(2, 0, 1), cfg)


def preprocess_images(images: list[ImageLike], cfg: ImageProcessorConfig) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Several images concatenated along the patch axis, with one grid per image."""
    out = [preprocess_image(im, cfg) for im in images]
    return np.concatenate([p for p, _ in out]), [g for _, g in out]
