"""``qwen3vl-onnx batch``: an OpenAI batch file through the server's own app, in process.

Each input line (``{"custom_id", "method": "POST", "url", "body"}``) is posted to the same FastAPI
app ``serve`` runs, over an in-process transport: the same validation, media rules, limits and
continuous-batching engine, so an answer's ``body`` is exactly what ``serve`` would send. Output
lines take OpenAI's batch output shape and are appended (one ``write`` each, flushed) as requests
finish, so a killed run loses at most the answers in flight. Started again with the same arguments,
it keeps every whole line, drops a torn last one, and asks only what is still unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import UserError
from .settings import ServerSettings

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


@dataclass
class Request:
    line: int  # 1-based line number in INPUT
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass
class Rejected:
    """An input line that is answered by an error line without being run."""

    line: int
    custom_id: str | None
    code: str
    message: str


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def line(self) -> str:
        secs = time.perf_counter() - self.started
        return (f"batch: {self.done} done, {self.failed} failed, {self.skipped} skipped as already answered; "
                f"{self.tokens} tokens in {secs:.1f} s ({self.tokens / max(secs, 1e-9):.1f} tok/s)")  # fmt: skip


def parse_input(path: Path) -> Iterator[Request | Rejected]:
    """INPUT's lines as requests, or as rejections naming what is wrong (blank lines are skipped)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read the batch input ({e.strerror})") from None
    seen: set[str] = set()
    with f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Rejected(n, None, "invalid_json", f"line {n} is not UTF-8 text")
                continue
            if text.strip():
                item = _parse_line(n, text)
                if isinstance(item, Request):
                    if item.custom_id in seen:
                        said = f"custom_id {item.custom_id!r} repeats an earlier line"
                        item = Rejected(n, item.custom_id, "duplicate_custom_id", said)
                    seen.add(item.custom_id)
                yield item


def _parse_line(n: int, text: str) -> Request | Rejected:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        return Rejected(n, None, "invalid_json", f"line {n} is not JSON ({e.msg} at column {e.colno})")
    if not isinstance(d, dict):
        return Rejected(n, None, "invalid_request", f"line {n} is not a JSON object")
    cid = d.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return Rejected(n, None, "missing_custom_id", f"line {n} has no custom_id (a non-empty string)")
    if d.get("method", "POST") != "POST":
        return Rejected(n, cid, "invalid_method", f"line {n}: method must be POST")
    if d.get("url") not in URLS:
        return Rejected(n, cid, "invalid_url", f"line {n}: url must be one of {', '.join(URLS)}")
    body = d.get("body")
    if not isinstance(body, dict):
        return Rejected(n, cid, "missing_body", f"line {n} has no body (a JSON object)")
    if body.get("stream"):
        return Rejected(n, cid, "invalid_request", f"line {n}: a batch answers whole, so stream must be false")
    return Request(n, cid, d["url"], body)


def answer_key(custom_id: str | None, code: str | None, line: int) -> str | int:
    """What an input line is known by in OUTPUT: its custom_id, or its line number when it has no id
    of its own (none usable, or a duplicate of an earlier line's), the same on both sides of a resume."""
    return line if custom_id is None or code == "duplicate_custom_id" else custom_id


def answered(path: Path) -> set[str | int]:
    """The ``answer_key`` of every line OUTPUT already holds. A last line cut short by a kill is
    removed from the file, so its request is asked again."""
    keys: set[str | int] = set()
    if not path.exists():
        return keys
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
    for raw in data[:keep].splitlines():
        try:
            out = json.loads(raw)
        except json.JSONDecodeError:
            raise UserError(f"{path}: holds a line that is not JSON; not a batch output of this job") from None
        err = out.get("error") or {}
        keys.add(answer_key(out.get("custom_id"), err.get("code"), int(err.get("line", -1))))
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return keys


class Writer:
    """Appends output lines, one write and flush each: a kill can tear only the line being written."""

    def __init__(self, path: Path):
        self.f: TextIO = open(path, "a", encoding="utf-8")

    def put(self, line: dict[str, Any]) -> None:
        self.f.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.f.flush()

    def close(self) -> None:
        os.fsync(self.f.fileno())
        self.f.close()


def _line_id() -> str:
    return "batch_req_" + uuid.uuid4().hex[:24]


def error_line(r: Rejected) -> dict[str, Any]:
    return {"id": _line_id(), "custom_id": r.custom_id, "response": None,
            "error": {"code": r.code, "message": r.message, "line": r.line}}  # fmt: skip


def response_line(req: Request, status: int, body: Any) -> dict[str, Any]:
    """OpenAI's batch output line; a refused request (4xx/5xx) also gets ``error`` with its line."""
    error = None
    if status != 200:
        e = body.get("error", {}) if isinstance(body, dict) else {}
        error = {"code": e.get("code") or f"http_{status}", "message": e.get("message") or f"status {status}", "line": req.line}
    response = {"status_code": status, "request_id": "req_" + uuid.uuid4().hex[:24], "body": body}
    return {"id": _line_id(), "custom_id": req.custom_id, "response": response, "error": error}


@contextlib.asynccontextmanager
async def started(app: Any) -> AsyncIterator[None]:
    """``app`` running (its lifespan entered) with its bundle loaded; a failed load is one line."""
    state = app.state.qwen
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(state.loader.join)
        if state.load_error is not None:
            raise UserError(state.load_error)
        yield


async def ask(client: Any, req: Request) -> dict[str, Any]:
    """One request posted to the app behind ``client``, answered as its output line. A 429 (the
    engine's queue full) is asked again after a pause, as a client of ``serve`` would, never written."""
    r = await client.post(req.url, json=req.body)
    pause = 0.05
    while r.status_code == 429:
        await asyncio.sleep(pause)
        pause = min(2 * pause, 1.0)
        r = await client.post(req.url, json=req.body)
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:500], "code": f"http_{r.status_code}"}}
    return response_line(req, r.status_code, body)


def in_process_client(app: Any) -> Any:
    """An HTTP client whose requests go straight to ``app`` (no socket)."""
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://batch", timeout=None)


def record(line: dict[str, Any], writer: Writer, summary: Summary) -> None:
    """An answered line written, and counted as done (with its tokens) or failed."""
    writer.put(line)
    if line["error"]:
        summary.failed += 1
    else:
        summary.done += 1
        summary.tokens += int((line["response"]["body"].get("usage") or {}).get("completion_tokens", 0))


async def run_requests(app: Any, requests: list[Request], writer: Writer, summary: Summary, parallel: int,
                       progress: Any) -> None:  # fmt: skip
    """Post every request to a started ``app`` with at most twice its ``parallel`` slots waiting on
    it at once (enough to keep the slots fed while the next prompts are read), each answer written
    as it arrives."""
    gate = asyncio.Semaphore(2 * parallel)
    async with in_process_client(app) as client:

        async def one(req: Request) -> None:
            async with gate:
                line = await ask(client, req)
            record(line, writer, summary)
            progress(1, summary.tokens)

        await asyncio.gather(*(one(req) for req in requests))


# How the requests still to ask are answered: in this process, or on Ray actors (``ray_batch``).
Answerer = Callable[[list[Request], Writer, Summary], None]


def run_batch(items: Iterable[Request | Rejected], output_path: Path, answer: Answerer) -> int:
    """The whole job: resume state, error lines for rejected input, the rest given to ``answer``.
    Exit status: 0 when every line of this run was answered without error, 1 otherwise."""
    done = answered(output_path)
    summary = Summary()
    todo: list[Request] = []
    writer = Writer(output_path)
    try:
        for item in items:
            if answer_key(item.custom_id, getattr(item, "code", None), item.line) in done:
                summary.skipped += 1
            elif isinstance(item, Rejected):
                writer.put(error_line(item))
                summary.failed += 1
            else:
                todo.append(item)
        if todo:
            answer(todo, writer, summary)
    finally:
        writer.close()
    print(summary.line(), file=sys.stderr)
    return 1 if summary.failed else 0


def in_this_process(bundle: Path, settings: ServerSettings, threads: int | None) -> Answerer:
    """Answer through one app (one engine of ``settings.parallel`` slots) in this process."""

    def answer(todo: list[Request], writer: Writer, summary: Summary) -> None:
        from .launch import build_app

        asyncio.run(_serve_batch(build_app(bundle, settings, threads), todo, writer, summary, settings))

    return answer


class Progress:
    """done/total, requests/s and ETA on a terminal (tqdm), tokens/s beside them; silent otherwise."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="req", file=sys.stderr, disable=None, dynamic_ncols=True)
        self.started = time.perf_counter()

    def __call__(self, n: int, tokens: int) -> None:
        self.bar.update(n)
        self.bar.set_postfix_str(f"{tokens / max(time.perf_counter() - self.started, 1e-9):.1f} tok/s", refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


IMAGE_FILES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_FILES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


def folder_requests(directory: Path, prompt: str, videos: bool, extra: dict[str, Any]) -> list[Request]:
    """``--images DIR`` / ``--videos DIR``: one request per file (sorted, so a rerun asks the same),
    custom_id its path inside DIR, the file given as a file:// URL (DIR is the allowed media dir)."""
    kinds = VIDEO_FILES if videos else IMAGE_FILES
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in kinds)
    if not files:
        raise UserError(f"{directory}: no {'video' if videos else 'image'} files ({', '.join(kinds)})")
    part = "video_url" if videos else "image_url"
    out = []
    for n, f in enumerate(files, 1):
        content = [{"type": part, part: {"url": f.resolve().as_uri()}}, {"type": "text", "text": prompt}]
        out.append(Request(n, f.relative_to(directory).as_posix(), URLS[0],
                           {"messages": [{"role": "user", "content": content}], **extra}))  # fmt: skip
    return out


async def _serve_batch(app: Any, todo: list[Request], writer: Writer, summary: Summary, settings: ServerSettings) -> None:
    async with started(app):
        with Progress(len(todo)) as progress:
            await run_requests(app, todo, writer, summary, settings.parallel, progress)
