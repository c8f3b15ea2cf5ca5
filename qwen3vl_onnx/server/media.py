"""Request messages -> pipeline messages, with every image and video URL resolved under the server's
rules: data URLs decoded; ``file://`` read only inside ``--allowed-media-dir`` (resolved first, so
symlinks and ``..`` cannot leave it); http(s) fetched only with ``--allow-remote-media``, with a
timeout and a size cap; at most ``--max-images`` pictures and ``--max-video-frames`` frames each.
Nothing a client sends is ever used as a plain path.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..runtime.preprocess import image_from_bytes
from .schemas import ImagePart, Message, TextPart, VideoPart
from .settings import ServerSettings


class MediaError(Exception):
    """A request's media refused: ``status`` is the HTTP code (400, 403 or 413)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _data_url(url: str) -> bytes:
    head, sep, body = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise MediaError(400, "data URL must be base64 (data:<type>;base64,<data>)")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(400, "data URL is not valid base64") from None


def confined_path(url: str, settings: ServerSettings) -> Path:
    """The file a ``file://`` URL names, if it lies inside the allowed folder once resolved."""
    root = settings.allowed_media_dir
    if root is None:
        raise MediaError(403, "file:// URLs are not allowed (the server was started without --allowed-media-dir)")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError(400, f"file URL with a host ({parsed.netloc}) is not supported")
    path = Path(urllib.parse.unquote(parsed.path))
    real = (root / path if not path.is_absolute() else path).resolve()
    if not real.is_relative_to(root.resolve()):
        raise MediaError(403, f"{url}: outside the allowed media folder")
    if not real.is_file():
        raise MediaError(400, f"{url}: no such file in the allowed media folder")
    return real


def _remote(url: str, settings: ServerSettings) -> bytes:
    if not settings.allow_remote_media:
        raise MediaError(403, f"{url}: remote media are not fetched (the server was started without --allow-remote-media)")
    cap = int(settings.max_body_mb * 2**20)
    try:
        with urllib.request.urlopen(url, timeout=settings.remote_timeout_s) as r:  # noqa: S310 (http/https checked by the caller)
            data = r.read(cap + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise MediaError(400, f"{url}: could not be fetched ({type(e).__name__})") from None
    if len(data) > cap:
        raise MediaError(413, f"{url}: larger than {settings.max_body_mb:g} MB (--max-body-mb)")
    return data


def _source(url: str, settings: ServerSettings) -> bytes | Path:
    if url.startswith("data:"):
        return _data_url(url)
    if url.startswith("file://"):
        return confined_path(url, settings)
    if url.startswith(("http://", "https://")):
        return _remote(url, settings)
    raise MediaError(400, f"unsupported media URL (data:, file:// or http(s)://): {url[:60]}")


def _image(part: ImagePart, settings: ServerSettings) -> dict[str, Any]:
    src = _source(part.image_url.url, settings)
    data = src if isinstance(src, bytes) else src.read_bytes()
    try:  # the header says the size: refuse a huge image before decoding its pixels
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        w = h = 0  # not an image: the decoder below says so
    if w * h > settings.max_image_pixels:
        raise MediaError(400, f"image of {w}x{h} is over the limit of {settings.max_image_pixels / 1e6:g} million pixels")
    try:
        image = image_from_bytes(data, "image" if isinstance(src, bytes) else str(src))
    except UserError as e:
        raise MediaError(400, str(e)) from None
    return {"type": "image", "image": image}


def _video(part: VideoPart, settings: ServerSettings, frame_cap: int) -> dict[str, Any]:
    v = part.video_url
    limit = min(settings.max_video_frames, frame_cap)
    if v.max_frames is not None and v.max_frames > limit:
        raise MediaError(400, f"video max_frames {v.max_frames} is over the limit of {limit} (--max-video-frames or the "
                              "checkpoint's)")  # fmt: skip
    src = _source(v.url, settings)
    out: dict[str, Any] = {"type": "video", "video": src if isinstance(src, bytes) else str(src),
                           "max_frames": v.max_frames or limit}  # fmt: skip
    for key in ("fps", "max_pixels", "video_start", "video_end"):
        if getattr(v, key) is not None:
            out[key] = getattr(v, key)
    return out


def pipeline_messages(messages: list[Message], settings: ServerSettings, frame_cap: int | None = None) -> list[dict[str, Any]]:
    """The request's messages as the pipeline takes them, media resolved and limits checked
    (``frame_cap``: the checkpoint's own frame limit, when lower than the server's)."""
    pictures = sum(1 for m in messages if isinstance(m.content, list) for p in m.content if not isinstance(p, TextPart))
    if pictures > settings.max_images:
        raise MediaError(400, f"request has {pictures} images and videos, the limit is {settings.max_images} (--max-images)")
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        if isinstance(m.content, list):
            parts: list[dict[str, Any]] = []
            for p in m.content:
                if isinstance(p, TextPart):
                    parts.append({"type": "text", "text": p.text})
                elif isinstance(p, ImagePart):
                    parts.append(_image(p, settings))
                else:
                    parts.append(_video(p, settings, frame_cap or settings.max_video_frames))
            msg["content"] = parts
        else:
            msg["content"] = m.content or ""
        if m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out
