"""What the routes share (``State``): the engine once loaded, metrics, settings, the shutdown's
drain. A module of its own so each route's module can name it without importing the app."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .engine import Engine
from .metrics import Metrics
from .run import ApiError, Drain
from .settings import ServerSettings


class State:
    """What the routes share: the engine once loaded, the metrics, the settings, the shutdown's drain."""

    def __init__(self, settings: ServerSettings, metrics: Metrics | None):
        self.settings, self.metrics = settings, metrics
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.loader: threading.Thread | None = None  # the background load, while it runs
        self.on_load_failure: Callable[[], None] | None = None  # serve: stop the server (a Ray replica keeps 503s instead)
        self.created = int(time.time())
        self.drain = Drain(settings.shutdown_grace_s)

    def ready(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, self.load_error or "the model is still loading")
        return self.engine
