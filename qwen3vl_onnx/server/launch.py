"""What ``serve``, ``batch`` and the Ray deployments share to stand an app up: the check that a
bundle fits before minutes of loading, the listening socket, and the app over a bundle. Below
``command`` so the batch and Ray modules need not import the command that imports them."""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path
from typing import Any

from ..config import Qwen3VLConfig
from ..errors import UserError
from .settings import ServerSettings


def check_fits(bundle: Path, settings: ServerSettings) -> None:
    """Refuse at once what the server could never serve, before the minutes a large model takes to
    load: a context beyond the model's, or graphs plus the slots' KV cache beyond the memory left."""
    from ..runtime.cache import KVCache
    from ..runtime.model import cache_dtypes, kv_cache_choice, read_manifest
    from .memory import available_memory

    manifest = read_manifest(bundle)
    t = Qwen3VLConfig.from_manifest(manifest["config"]).text
    dtypes = cache_dtypes(manifest, kv_cache_choice(bundle, manifest, settings.kv_cache))
    cache = KVCache.size_bytes(t.num_hidden_layers, settings.parallel, t.num_key_value_heads, t.head_dim, settings.ctx_size + 1,
                               dtypes)  # fmt: skip
    graphs = sum(f.stat().st_size for f in bundle.iterdir() if ".onnx" in f.name and f.is_file())
    free = available_memory()
    if free is not None and cache + graphs > free:
        raise UserError(f"the graphs ({graphs / 2**30:.1f} GiB) and the KV cache for --parallel {settings.parallel} x --ctx-size "
                        f"{settings.ctx_size} ({cache / 2**30:.1f} GiB) need more than the {free / 2**30:.1f} GiB of memory "
                        "available: lower --parallel or --ctx-size")  # fmt: skip


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` before anything is loaded, so a busy port or an address
    this machine does not have is a one-line error at once (uvicorn serves on it)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as e:
        raise UserError(f"--host {host!r} is not an address to listen on ({getattr(e, 'strerror', None) or e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not a port in use: only one left in TIME_WAIT
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = ": another process listens there (pick another --port)" if e.errno == errno.EADDRINUSE else ""
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}){hint}") from None
    sock.set_inheritable(True)
    return sock


def build_app(bundle: str | Path, settings: ServerSettings, threads: int | None = None) -> Any:
    """The FastAPI app serving ``bundle``; it loads the bundle in the background when started (so
    ``/health`` answers 503 meanwhile). Also what a Ray Serve deployment wraps as its ingress."""
    from ..runtime.pipeline import Pipeline
    from .app import create_app
    from .engine import Engine

    def load(metrics: Any) -> Engine:
        pipe = Pipeline.from_bundle(bundle, threads=threads, context_length=settings.ctx_size, kv_cache=settings.kv_cache)
        engine = Engine(pipe, settings, metrics)
        logging.getLogger("qwen3vl_onnx.server").info("loaded %s: %d slots of %d tokens", bundle, settings.parallel,
                                                     settings.ctx_size)  # fmt: skip
        return engine

    return create_app(settings, load)
