"""The FastAPI application: routes, API key, body limit, errors in OpenAI's shape.

``create_app(settings, load)`` returns at once; ``load()`` (the bundle and its engine) runs in the
background at startup, and ``/health`` answers 503 until it is done. Every error is
``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status, never a stack trace.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..errors import UserError
from .completions import chat_completion
from .engine import Engine
from .metrics import Metrics
from .responses import ResponseStore, create_response
from .run import ApiError, ClientGone, error_body
from .schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    ResponsesRequest,
    SlotState,
    TokenizeMessages,
    TokenizeResponse,
    TokenizeText,
)
from .settings import ServerSettings
from .state import State
from .text_completions import text_completion
from .ui import add_page, is_page

log = logging.getLogger("qwen3vl_onnx.server")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in ((400, "bad request"), (401, "missing or wrong API key"), (403, "media not allowed"),
                       (404, "unknown model"), (405, "method not allowed"), (413, "body or media too large"),
                       (429, "queue full"), (500, "internal error"), (503, "still loading"))
}  # fmt: skip


# A streamed answer: server-sent events, each a JSON ``data`` line (and for /v1/responses an ``event`` name).
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}, "required": ["data"]}
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


_UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _where(loc: tuple) -> str:
    """A validation error's field path as a client wrote it: pydantic's union-branch labels
    ('str', 'list[...]', a model's class name, a tag repeating its field's name) left out (the API's
    own field names are lower-case)."""
    out: list[str] = []
    for x in map(str, loc):
        if x == "body" or "[" in x or x[:1].isupper() or x in _UNION_BRANCHES or (out and out[-1] == x):
            continue
        out.append(x)
    return ".".join(out)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before it is read whole."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, f"request body is over {self.limit / 2**20:g} MB (--max-body-mb)")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body is over {self.limit / 2**20:g} MB (--max-body-mb)")
            return message

        await self.app(scope, limited, send)


def create_app(settings: ServerSettings, load: Callable[[Metrics | None], Engine]) -> FastAPI:
    metrics = Metrics() if settings.metrics else None
    state = State(settings, metrics)

    def start() -> None:
        try:
            state.engine = load(metrics)
        except UserError as e:  # a one-line reason (e.g. memory), reported like any failed load
            state.load_error = f"the model failed to load: {e}"
        except Exception as e:  # reported by /health and every route
            log.exception("loading failed")
            first = (str(e).splitlines() or [""])[0][:200]
            state.load_error = f"the model failed to load: {type(e).__name__}: {first}"
        if state.load_error is not None and state.on_load_failure is not None:
            state.on_load_failure()
        elif state.load_error is not None:
            log.error("%s", state.load_error)

    async def lifespan(app: FastAPI):  # noqa: ANN202
        state.drain.bind()
        state.loader = threading.Thread(target=start, name="qwen3vl-load", daemon=True)
        state.loader.start()
        yield

    app = FastAPI(title="qwen3vl-onnx", version="1", lifespan=lifespan, responses=ERRORS)
    app.state.qwen = state

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next: Callable) -> Response:
        open_path = request.url.path == "/health" or (settings.ui and is_page(request.url.path))
        if settings.api_key and not open_path and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
                return error_response(401, "missing or invalid API key (Authorization: Bearer KEY)", code="invalid_api_key")
        try:
            response = await call_next(request)
        except Exception:  # never a traceback to the client
            log.exception("request failed")
            response = error_response(500, "internal server error")
        if metrics is not None:  # by route template, so made-up paths do not each get a series
            route = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.count("requests", route=route, status=str(response.status_code))
        return response

    app.add_middleware(BodyLimit, limit=int(settings.max_body_mb * 2**20))  # type: ignore[arg-type]
    if settings.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=[settings.cors_origin], allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        """A body the API cannot take is a 400, as OpenAI's API, vLLM and llama.cpp answer it."""
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(400, "request body is not valid JSON")
        kind = request.headers.get("content-type", "")
        if kind and "json" not in kind.lower() and any(tuple(err.get("loc", ())) == ("body",) for err in errors):
            return error_response(400, f"the request body must be JSON sent as Content-Type: application/json, "
                                       f"got Content-Type: {kind[:60]}")  # fmt: skip
        # a union field reports one error per member; the deepest one names what the client got wrong
        first = max(errors, key=lambda err: len(err.get("loc", ())), default={})
        where = _where(first.get("loc", ()))
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request", for logs and metrics

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        r = error_response(e.status_code, str(e.detail))
        r.headers.update(e.headers or {})  # 405 carries Allow
        return r

    @app.get("/health", response_model=Health)
    async def health() -> Any:
        if state.engine is None:
            return error_response(503, state.load_error or "the model is still loading")
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> Any:
        return {"object": "list", "data": [ModelCard(id=settings.model_name, created=state.created)]}

    @app.get("/v1/models/{model}", response_model=ModelCard)
    async def model(model: str) -> Any:
        if model != settings.model_name:
            raise ApiError(404, f"model {model[:80]!r} is not served here (GET /v1/models lists {settings.model_name!r})",
                           "model", "model_not_found")  # fmt: skip
        return ModelCard(id=settings.model_name, created=state.created)

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses=STREAMED)  # fmt: skip
    async def completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await chat_completion(body, state, request)

    @app.post("/v1/completions", response_model=Completion,
              responses=STREAMED)  # fmt: skip
    async def completions_legacy(body: CompletionRequest, request: Request) -> Any:
        return await text_completion(body, state, request)

    if settings.ui:
        add_page(app)
    stored = ResponseStore()

    @app.post("/v1/responses", responses=STREAMED)
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        return await create_response(body, state, request, stored)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeText | TokenizeMessages) -> Any:
        pipe = state.ready().pipe
        if isinstance(body, TokenizeText):
            ids = pipe.tokenizer.encode(body.prompt, add_special_tokens=False).ids
        else:
            from ..runtime.constrain import parse_tools
            from .media import MediaError, pipeline_messages

            try:
                if body.tools:
                    parse_tools(body.tools)
                video = pipe.processors.video  # the same frame limit as a completion's
                msgs = await run_in_threadpool(pipeline_messages, body.messages, settings, video.max_frames if video else None)
                ids = (await run_in_threadpool(pipe.prepare, msgs, body.add_generation_prompt, body.tools)).ids
            except MediaError as e:
                raise ApiError(e.status, str(e)) from None
            except UserError as e:
                raise ApiError(400, str(e)) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": settings.ctx_size}

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> Any:
        tokenizer = state.ready().pipe.tokenizer
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        unknown = next((t for t in body.tokens if t >= size or tokenizer.id_to_token(t) is None), None)
        if unknown is not None:
            raise ApiError(400, f"token id {unknown} is not in the tokenizer's vocabulary (0..{size - 1})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/slots", response_model=list[SlotState])
    async def slots() -> Any:
        return state.ready().slot_states()

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics_route() -> Response:
        if metrics is None:
            raise ApiError(404, "metrics are off (start the server with --metrics)")
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the one model id this server answers to as an enum (so a
        client or a fuzzer knows it)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.get("components", {}).get("schemas", {})
            props = schemas.get("ChatCompletionRequest", {}).get("properties", {})
            if "model" in props:  # optional: null means the model served
                props["model"] = {"anyOf": [{"type": "string", "enum": [settings.model_name]}, {"type": "null"}]}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
