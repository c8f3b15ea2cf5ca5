"""OpenAI-style messages -> the checkpoint's own chat template -> prompt text plus images in order.

The template is the one shipped with the checkpoint (``chat_template.jinja``, ``chat_template.json``
or ``tokenizer_config.json``), rendered with the same Jinja settings transformers uses, so a
Thinking or Instruct checkpoint formats prompts the way it was trained.
"""

from __future__ import annotations

import base64
import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import UserError
from .preprocess import ImageLike, image_from_bytes
from .video import VideoRequest

Visual = ImageLike | VideoRequest  # what a message part shows, in prompt order
VIDEO_OPTIONS = {"fps": "fps", "max_frames": "max_frames", "max_pixels": "max_pixels", "video_start": "start",
                 "video_end": "end"}  # fmt: skip


def load_chat_template(directory: Path) -> str:
    """Find the chat template in a checkpoint or bundle directory."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        p = directory / name
        if p.is_file():
            tpl = json.loads(p.read_text()).get("chat_template")
            if isinstance(tpl, list):  # named templates: take the default one
                tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
            if tpl:
                return tpl
    raise UserError(f"{directory}: no chat template found (chat_template.jinja/json or tokenizer_config.json)")


def _raise(message: str) -> None:
    raise UserError(f"chat template: {message}")


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """Compiling a template costs milliseconds; every prompt of a session reuses it."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template does not compile: {e}") from None


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template failed to render: {e}") from None


def media_from_url(url: str, what: str) -> bytes | str:
    """An ``image_url``/``video_url``: a data URL's bytes or a local path (``file://`` or plain);
    never fetched from the network (the server has its own, stricter rules: server/media.py)."""
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except (ValueError, IndexError):
            raise UserError(f"{what} data URL could not be decoded") from None
    if url.startswith("file://"):
        return url[len("file://") :]
    if url.startswith(("http://", "https://")):
        raise UserError(f"{url}: remote {what} URLs are not fetched; download the {what} and pass its path")
    return url


def _image_from_url(url: str) -> ImageLike:
    src = media_from_url(url, "image")
    return image_from_bytes(src, "image data URL") if isinstance(src, bytes) else src


def _part_url(part: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    """The url of an ``image_url``/``video_url`` part and the fields beside it (a video's options)."""
    ref = part.get(kind)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise UserError(f"{kind} part needs a url")
    return url, ref if isinstance(ref, dict) else {}


def _video_part(part: dict[str, Any], source: Any) -> VideoRequest:
    """A video part's source with its options (``fps``, ``max_frames``, ``max_pixels``,
    ``video_start``/``video_end`` in seconds), read from the part as qwen-vl-utils spells them."""
    if source is None or (isinstance(source, str) and not source):
        raise UserError("video part needs a video (a path, a data URL or a list of frames)")
    return VideoRequest(source, **{ours: part[key] for key, ours in VIDEO_OPTIONS.items() if part.get(key) is not None})


def _call_with_object_arguments(call: Any) -> Any:
    """An earlier assistant call as templates take it: OpenAI clients send ``arguments`` as a JSON
    string, the templates write objects with ``tojson`` (a string they would write quoted)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": args}}


def split_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Visual]]:
    """Messages for the template (images and videos as placeholders) and what they show, in prompt order."""
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list")
    out, images = [], []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise UserError("each message needs a role")
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_call_with_object_arguments(c) for c in m["tool_calls"]]}
        content = m.get("content", "")
        if content is None or isinstance(content, str):
            out.append({**m, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise UserError(f"message content must be text or a list of parts, got {type(content).__name__}")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image" or (kind is None and isinstance(part, dict) and "image" in part):
                images.append(part.get("image") if part.get("image") is not None else part.get("path"))
                parts.append({"type": "image"})
            elif kind == "image_url":
                images.append(_image_from_url(_part_url(part, kind)[0]))
                parts.append({"type": "image"})
            elif kind == "video" or (kind is None and isinstance(part, dict) and "video" in part):
                source = part.get("video")
                images.append(_video_part(part, media_from_url(source, "video") if isinstance(source, str) else source))
                parts.append({"type": "video"})
            elif kind == "video_url":
                url, options = _part_url(part, kind)
                images.append(_video_part({**part, **options}, media_from_url(url, "video")))
                parts.append({"type": "video"})
            else:
                raise UserError(f"unsupported message content part: {kind!r}")
        out.append({**m, "content": parts})
    return out, images
