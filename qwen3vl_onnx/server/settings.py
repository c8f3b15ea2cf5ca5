"""What ``qwen3vl-onnx serve`` was started with: one frozen value handed to every layer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerSettings:
    """Safe by default: loopback only, no file or remote media, no CORS, bounded everything."""

    model_name: str  # the id /v1/models lists and requests name
    api_key: str | None = None  # every route but /health needs "Authorization: Bearer KEY" when set
    parallel: int = 4  # slots: requests decoded together
    ctx_size: int = 4096  # tokens per slot (prompt + answer)
    queue_size: int = 64  # requests waiting for a slot before 429
    allowed_media_dir: Path | None = None  # file:// URLs inside it are read; None: file URLs refused
    allow_remote_media: bool = False  # http(s) image/video URLs fetched (timeout and size cap)
    remote_timeout_s: float = 10.0
    cors_origin: str | None = None
    max_images: int = 8  # images (and videos) per request
    max_video_frames: int = 64  # frames sampled per video at most
    max_image_pixels: int = 40_000_000  # an image file larger than this is refused before it is decoded
    max_body_mb: float = 20.0  # request body (base64 media included)
    metrics: bool = False  # GET /metrics
    prefill_slice_ms: int = 250  # longest prompt call while other requests decode (keeps their streams flowing)
    shutdown_grace_s: float = 10.0  # once stopping, how long running answers may still take before they are cut
    ui: bool = True  # the chat page at / (--no-ui: off)
    kv_cache: str | None = None  # KV cache precision (None: the bundle's default)
