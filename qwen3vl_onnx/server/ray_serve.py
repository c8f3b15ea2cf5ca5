"""``serve --ray-replicas N``: the same FastAPI app as the ingress of a Ray Serve deployment.

Each replica builds the app itself (``build_app`` when Ray starts it) and so loads its own engine:
its own slots, caches and ONNX Runtime threads (the CPUs Ray reserves for it). Ray Serve's proxy
listens on ``--host``/``--port`` of the head node and spreads requests over the replicas; the API key, the media
rules, streaming and the error bodies are the app's own, unchanged. A replica lets at most its slots
plus its queue in at once (``max_ongoing_requests``), so the engine's own 429 still says "full".

``deployment(...)`` is also the entry point for a user's own ``serve.run`` (see docs/SERVING.md).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from .settings import ServerSettings

log = logging.getLogger("qwen3vl_onnx.server")

APP_NAME = "qwen3vl-onnx"


def deployment(bundle: str | Path, settings: ServerSettings, replicas: int, cpus: int) -> Any:
    """A bound Ray Serve application: ``replicas`` copies of the app serving ``bundle``, each with
    ``cpus`` CPUs reserved and as many ONNX Runtime threads."""
    from ray import serve

    bundle = Path(bundle).resolve()

    @serve.ingress()
    class Qwen3VL:
        def __serve_build_asgi_app__(self) -> Any:  # called by Ray Serve on each replica, after __init__
            from .launch import build_app

            return build_app(bundle, settings, cpus)

    options = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": cpus},
               "max_ongoing_requests": settings.parallel + settings.queue_size,
               # a replica being stopped lets its running answers finish, as serve's --shutdown-grace does
               "graceful_shutdown_timeout_s": settings.shutdown_grace_s + 2,
               "logging_config": {"enable_access_log": False, "log_level": "WARNING"}}  # fmt: skip
    return serve.deployment(Qwen3VL, name="Qwen3VL", **options).bind()


def run_ray_serve(bundle: str, settings: ServerSettings, address: str, replicas: int | None, threads: int | None,
                  host: str, port: int) -> int:  # fmt: skip
    """Start the deployment on the cluster at ``address`` and keep it up until SIGINT/SIGTERM."""
    from .launch import listen
    from .ray_cluster import LOCAL, connect, engine_cpus, node_cpus

    if address == LOCAL:  # the proxy listens here: a busy port or a bad address is a one-line error before Ray starts
        listen(host, port).close()
    ray = connect(address, "serve --ray-replicas")
    try:
        from ray import serve

        count, cpus = engine_cpus(node_cpus(ray), replicas, threads)
        # one HTTP proxy, on the head node: the address clients use whatever the replicas' nodes
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        log.info("starting %d replicas of %s on Ray (%d CPUs each)", count, bundle, cpus)
        serve.run(deployment(bundle, settings, count, cpus), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        log.info("listening on %s through Ray Serve; each replica answers /health 503 until its bundle is loaded", url)
        _wait_for_signal()
        log.info("stopping the Ray Serve application")
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
