"""``qwen3vl-onnx chat``: a terminal conversation that keeps its KV cache between turns.

Lines typed (or piped on standard input) are the user's messages; lines starting with ``/`` are
commands. Ctrl-C stops the answer being written and returns to the prompt; Ctrl-D or ``/quit``
leaves. Per-turn figures go to standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from .cli_args import generation_overrides, output_overrides, video_part
from .errors import UserError
from .runtime.generate import stats_line

HELP = """commands:
  /image PATH    attach a picture to your next message (repeatable)
  /video PATH    attach a video (repeatable; --video-fps and --video-max-frames apply)
  /system TEXT   set the system message
  /reset         forget the conversation
  /save FILE     write the conversation as OpenAI-style JSON messages
  /load FILE     continue a saved conversation
  /result TEXT   the result of the answer's next tool call (with --tools); the answer goes on once all have one
  /help, /quit"""


def write_stream(stream: Any, hide_reasoning: bool, out: TextIO) -> None:
    """Print an answer as it comes: reasoning (unless hidden), then a blank line, then the answer."""
    in_reasoning = False
    for piece in stream:
        part = getattr(piece, "part", "text")
        if part == "reasoning":
            if hide_reasoning:
                continue
            in_reasoning = True
        elif in_reasoning and piece:
            out.write("\n\n")
            in_reasoning = False
        out.write(piece)
        out.flush()


def saved_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history with picture and video parts as ``image_url``/``video_url`` file URLs (absolute),
    as OpenAI-style APIs have them; a video's options stay beside its URL."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [_saved_part(p) for p in content]
        out.append({**m, "content": content})
    return out


def _saved_part(p: dict[str, Any]) -> dict[str, Any]:
    for kind in ("image", "video"):
        if p.get("type") == kind and isinstance(p.get(kind), str | Path):
            options = {k: v for k, v in p.items() if k not in ("type", kind)}
            return {"type": f"{kind}_url", f"{kind}_url": {"url": "file://" + str(Path(p[kind]).resolve()), **options}}
    return p


def load_messages(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError:
        raise UserError(f"{path}: not JSON") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") for m in messages
    ):
        raise UserError(f"{path}: expected a list of messages with roles system, user or assistant")
    return messages


class ChatSession:
    """The state of one terminal chat: the conversation and the pictures and videos waiting for the next message."""

    def __init__(self, conv: Any, args: argparse.Namespace, out: TextIO, err: TextIO):
        self.conv, self.args, self.out, self.err = conv, args, out, err
        self.attached: list[dict[str, Any]] = []  # image and video parts for the next message
        self.results: list[str] = []  # results given so far for the last answer's tool calls
        self.system: str | None = args.system
        self.failed = False

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to leave. Each says what it did on standard error."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            print(HELP, file=self.err)
        elif name in ("/image", "/video"):
            kind = name[1:]
            if not Path(arg).is_file():
                raise UserError(f"{arg or '(no path)'}: {kind} file not found")
            self.attached.append({"type": "image", "image": arg} if kind == "image" else video_part(arg, self.args))
            self._note(f"{kind} attached: {arg} ({self._waiting()} for your next message)")
        elif name == "/system":
            self.system = arg or None
            rest = [m for m in self.conv.messages if m["role"] != "system"]
            self.conv.messages = ([{"role": "system", "content": self.system}] if self.system else []) + rest
            self._note("system message set" if self.system else "system message cleared")
        elif name == "/reset":
            dropped = len(self.attached)
            self.conv.reset(self.system)
            self.attached = []
            self._note("conversation reset" + (f", {dropped} attachment(s) dropped" if dropped else ""))
        elif name == "/result":
            self.result(arg)
        elif name == "/save":
            self._save(Path(arg))
        elif name == "/load":
            messages = load_messages(Path(arg))
            self.conv.reset()
            self.conv.messages = messages
            self.system = next((m["content"] for m in messages if m["role"] == "system"), None)
            self._note(f"loaded {len(messages)} messages from {arg}")
        else:
            raise UserError(f"unknown command {name} (/help lists them)")
        return True

    def _note(self, text: str) -> None:
        print(f"[{text}]", file=self.err)

    def _waiting(self) -> str:
        kinds = [p["type"] for p in self.attached]
        return ", ".join(f"{kinds.count(k)} {k}{'s' if kinds.count(k) > 1 else ''}" for k in ("image", "video") if k in kinds)

    def _save(self, path: Path) -> None:
        if not path.name:
            raise UserError("/save needs a file name")
        tmp = path.with_name(path.name + ".partial")
        try:
            tmp.write_text(json.dumps({"messages": saved_messages(self.conv.messages)}, ensure_ascii=False, indent=1))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"{path}: cannot write ({e.strerror})") from None
        print(f"[saved {len(self.conv.messages)} messages to {path}]", file=self.err)

    def ask(self, text: str | None) -> None:
        """One turn (``text`` None: the tool results gathered with /result). A turn that fails takes
        its attachments with it, and says so; one stopped with Ctrl-C before its answer began keeps
        them for the next message, and says so."""
        attached, self.attached = self.attached, []
        content: str | list[dict[str, Any]] = [*attached, {"type": "text", "text": text}] if attached else text or ""
        kept = len(self.conv.messages)
        stream = None
        overrides = {**generation_overrides(self.args), **output_overrides(self.args)}
        try:
            if text is None:
                results, self.results = self.results, []
                stream = self.conv.reply_to_calls(results, **overrides)
            else:
                stream = self.conv.send(content, **overrides)
            write_stream(stream, self.args.hide_reasoning, self.out)
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
            self.out.write("\n")
            if len(self.conv.messages) > kept:
                self._note("stopped; the question and the answer so far are kept")
            else:
                self.attached = attached + self.attached
                waiting = f"; {self._waiting()} wait for your next message" if self.attached else ""
                self._note(f"stopped before the answer began; the question was not kept{waiting}")
            return
        except UserError as e:
            if attached:
                self.attached = []
                raise UserError(f"{e} (this message and its {len(attached)} attachment(s) were not sent)") from None
            raise
        self.out.write("\n")
        for call in stream.result.tool_calls or []:
            print(f"[tool call {call.name}({call.arguments}) id {call.id}]", file=self.out)
        if stream.result.tool_calls:
            self._note(f"give each call its result with /result TEXT ({len(stream.result.tool_calls)} to give)")
        print(stats_line(stream.result, reused=True), file=self.err)

    def result(self, text: str) -> None:
        """One tool call's result; with the last one, the answer goes on."""
        last = self.conv.messages[-1] if self.conv.messages else {}
        calls = last.get("tool_calls") or [] if last.get("role") == "assistant" else []
        if len(self.results) >= len(calls):
            raise UserError("no tool call is waiting for a result")
        self.results.append(text)
        if len(self.results) < len(calls):
            self._note(f"result {len(self.results)} of {len(calls)} kept")
            return
        self.ask(None)


def run_chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The chat loop; exit status 0, 2 when any line ended in an error (so scripts can tell), 130
    when left with Ctrl-C (pressed twice at the prompt: once only clears the line)."""
    from .runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(args.bundle, threads=args.threads, prefill_graph=args.prefill_graph, kv_cache=args.kv_cache)
    session = ChatSession(pipe.chat(system=args.system), args, out, err)
    interactive = stdin.isatty()
    if interactive:
        print("qwen3vl-onnx chat: type a message, /help for commands, Ctrl-D to leave", file=err)
    interrupted = False
    while True:
        try:
            line = input("> ") if interactive else stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            if interrupted or not interactive:
                print("", file=err)
                return 130
            print("\n[Ctrl-C again, Ctrl-D or /quit leaves]", file=err)
            interrupted = True
            continue
        interrupted = False
        if not interactive and not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not session.command(line):
                    break
            else:
                session.ask(line)
        except UserError as e:
            print(f"error: {e}", file=err)
            session.failed = True
    return 2 if session.failed else 0
