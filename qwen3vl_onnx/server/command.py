"""``qwen3vl-onnx serve``: settings from the command line, the app, uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from .settings import ServerSettings


def settings_from(args: argparse.Namespace) -> ServerSettings:
    key = args.api_key
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise UserError(f"{args.api_key_file}: cannot read the API key ({e.strerror})") from None
        if not key:
            raise UserError(f"{args.api_key_file}: the API key file is empty")
    media = None
    if args.allowed_media_dir:
        media = Path(args.allowed_media_dir).expanduser().resolve()
        if not media.is_dir():
            raise UserError(f"{args.allowed_media_dir}: --allowed-media-dir is not a directory")
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        raise UserError(f"{bundle}: not a bundle (manifest.json is missing)")
    return ServerSettings(model_name=args.model_name or bundle.resolve().name, api_key=key or None, parallel=args.parallel,
                          ctx_size=args.ctx_size, queue_size=args.queue_size, allowed_media_dir=media,
                          allow_remote_media=args.allow_remote_media, cors_origin=args.cors_origin, max_images=args.max_images,
                          max_video_frames=args.max_video_frames, max_image_pixels=args.max_image_pixels,
                          max_body_mb=args.max_body_mb, metrics=args.metrics,
                          prefill_slice_ms=args.prefill_slice_ms, shutdown_grace_s=args.shutdown_grace)  # fmt: skip


def build_app(bundle: str | Path, settings: ServerSettings, threads: int | None = None) -> Any:
    """The FastAPI app serving ``bundle``; it loads the bundle in the background when started (so
    ``/health`` answers 503 meanwhile). Also what a Ray Serve deployment wraps as its ingress."""
    from ..runtime.pipeline import Pipeline
    from .app import create_app
    from .engine import Engine

    def load(metrics: Any) -> Engine:
        pipe = Pipeline.from_bundle(bundle, threads=threads, context_length=settings.ctx_size)
        engine = Engine(pipe, settings, metrics)
        logging.getLogger("qwen3vl_onnx.server").info("loaded %s: %d slots of %d tokens", bundle, settings.parallel,
                                                     settings.ctx_size)  # fmt: skip
        return engine

    return create_app(settings, load)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"serve needs the server extra: pip install -e '.[server]' in the project's clone "
                        f"({e.name} is missing)") from None
    settings = settings_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    app = build_app(args.bundle, settings, args.threads)
    drain = app.state.qwen.drain

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            drain.begin()  # running answers get the grace; uvicorn stops taking connections
            super().handle_exit(sig, frame)

    # uvicorn waits for open connections a little longer than the grace, so the last events get out
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 2)  # fmt: skip
    Server(config).run()
    return 0
