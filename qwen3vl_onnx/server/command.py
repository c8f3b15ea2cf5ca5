"""``qwen3vl-onnx serve``: settings from the command line, the app, uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..config import Qwen3VLConfig, TextConfig
from ..errors import UserError
from .launch import build_app, check_fits, listen
from .settings import ServerSettings

DEFAULT_CTX_SIZE = 4096  # tokens per slot unless --ctx-size says otherwise (or the model's context is shorter)


def settings_from(args: argparse.Namespace) -> ServerSettings:
    if args.api_key is not None and args.api_key_file:
        raise UserError("give the API key with --api-key or --api-key-file, not both")
    key = args.api_key
    if key is not None and not key.strip():  # e.g. --api-key "$KEY" with KEY unset: never serve open by mistake
        raise UserError("--api-key is empty; give a key, or leave the option out to serve without one")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{args.api_key_file}: cannot read the API key ({getattr(e, 'strerror', None) or e})") from None
        if not key:
            raise UserError(f"{args.api_key_file}: the API key file is empty")
    media = None
    if args.allowed_media_dir:
        media = Path(args.allowed_media_dir).expanduser().resolve()
        if not media.is_dir():
            raise UserError(f"{args.allowed_media_dir}: --allowed-media-dir is not a directory")
    bundle = Path(args.bundle)
    context = _text_config(bundle).max_position_embeddings
    if args.ctx_size is not None and args.ctx_size > context:
        raise UserError(f"--ctx-size {args.ctx_size} is over the model's context of {context} tokens")
    return ServerSettings(model_name=args.model_name or bundle.resolve().name, api_key=key or None, parallel=args.parallel,
                          ctx_size=args.ctx_size or min(DEFAULT_CTX_SIZE, context), queue_size=args.queue_size,
                          allowed_media_dir=media,
                          allow_remote_media=args.allow_remote_media, cors_origin=args.cors_origin, max_images=args.max_images,
                          max_video_frames=args.max_video_frames, max_image_pixels=args.max_image_pixels,
                          max_body_mb=args.max_body_mb, metrics=args.metrics,
                          prefill_slice_ms=args.prefill_slice_ms, shutdown_grace_s=args.shutdown_grace,
                          ui=not args.no_ui, kv_cache=args.kv_cache)  # fmt: skip


def _text_config(bundle: Path) -> TextConfig:
    from ..runtime.model import read_manifest

    return Qwen3VLConfig.from_manifest(read_manifest(bundle)["config"]).text


def _require_server_extra(command: str) -> None:
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import prometheus_client  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"{command} needs the server extra: pip install -e '.[server]' in the project's clone ({e.name} is missing)"
        ) from None


def run_batch_command(args: argparse.Namespace) -> int:
    """``qwen3vl-onnx batch``: INPUT (or a folder of pictures/videos) answered into OUTPUT."""
    from .batch import folder_requests, in_this_process, parse_input, run_batch

    _require_server_extra("batch")
    folder = args.images or args.videos
    if len(args.files) > 2:
        raise UserError(f"batch takes INPUT OUTPUT, got {len(args.files)} files")
    args.input, args.output = args.files if len(args.files) == 2 else (None, args.files[0])
    if (folder is None) == (args.input is None):
        raise UserError("give INPUT (an OpenAI batch file) or --images/--videos DIR, not both, not neither")
    requests = None
    if folder is not None:
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"{folder}: not a directory")
        if args.allowed_media_dir is None:
            args.allowed_media_dir = str(root)
        extra = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature)) if v is not None}
        requests = folder_requests(root, args.prompt, bool(args.videos), extra)
    elif not Path(args.input).is_file():
        raise UserError(f"{args.input}: batch input not found")
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"{output}: is a directory; OUTPUT is a JSONL file")
    settings = settings_from(args)
    check_fits(Path(args.bundle), settings)
    items = requests if requests is not None else parse_input(Path(args.input))
    if args.ray is not None:
        from .ray_batch import on_ray

        return run_batch(items, output, on_ray(Path(args.bundle), settings, args.threads, args.ray, args.ray_actors))
    if args.ray_actors is not None and args.ray is None:
        raise UserError("--ray-actors needs --ray ADDRESS|local")
    return run_batch(items, output, in_this_process(Path(args.bundle), settings, args.threads))


def run_serve(args: argparse.Namespace) -> int:
    _require_server_extra("serve")
    settings = settings_from(args)
    check_fits(Path(args.bundle), settings)
    if args.ray_replicas is not None or args.ray is not None:
        from .ray_serve import run_ray_serve

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
        return run_ray_serve(args.bundle, settings, args.ray or "local", args.ray_replicas, args.threads, args.host, args.port)
    import uvicorn

    sock = listen(args.host, args.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    app = build_app(args.bundle, settings, args.threads)
    state = app.state.qwen
    drain = state.drain

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            drain.begin()  # running answers get the grace; uvicorn stops taking connections
            super().handle_exit(sig, frame)

    # uvicorn waits for open connections a little longer than the grace, so the last events get out
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 2)
    server = Server(config)
    state.on_load_failure = lambda: setattr(server, "should_exit", True)  # a server that cannot answer stops
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    logging.getLogger("qwen3vl_onnx.server").info("listening on %s; loading %s (/health answers 503 until it is ready)",
                                                 url, args.bundle)  # fmt: skip
    try:
        server.run(sockets=[sock])
    except BaseException as e:
        _leave_if_loading(state, 130 if isinstance(e, KeyboardInterrupt) else 1, "interrupted")
        raise
    finally:
        sock.close()
    if state.load_error is not None:
        print(f"error: {state.load_error}", file=sys.stderr)
        _leave_if_loading(state, 2)
        return 2
    _leave_if_loading(state, 0)
    return 0


def _leave_if_loading(state: Any, code: int, why: str | None = None) -> None:
    """Exit at once if the model is still loading: ending the interpreter under ONNX Runtime's
    threads mid-load aborts the process ('terminate called without an active exception')."""
    if state.loader is None or not state.loader.is_alive():
        return
    if why:
        print(f"error: {why}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
