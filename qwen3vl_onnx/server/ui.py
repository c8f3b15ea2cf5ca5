"""The chat page at ``/``: plain HTML, CSS and JavaScript modules shipped in ``server/ui/`` and
served as they are (no build step, nothing fetched from elsewhere). It uses only the public API, so
it needs no key to load, while every API route still does; a Content-Security-Policy keeps it to
this server's own origin and forbids inline script."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

FILES = {"app.js": "text/javascript", "markdown.js": "text/javascript", "grounding.js": "text/javascript",
         "style.css": "text/css", "index.html": "text/html"}  # fmt: skip
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")  # fmt: skip


def is_page(path: str) -> bool:
    return path == "/" or path.startswith("/ui/")


def _file(name: str) -> bytes:
    return resources.files(__package__).joinpath("ui", name).read_bytes()


def add_page(app: FastAPI) -> None:
    """``GET /`` and ``GET /ui/NAME``, each with its content type, a short cache and the policy."""

    def serve(name: str) -> Response:
        headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                   "Cache-Control": "no-cache"}  # fmt: skip
        return Response(_file(name), media_type=FILES[name], headers=headers)

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return serve("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def static(name: str) -> Any:
        if name not in FILES:
            from .run import ApiError

            raise ApiError(404, f"no page file {name[:60]!r}")
        return serve(name)
