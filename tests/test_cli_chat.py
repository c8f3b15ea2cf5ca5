"""``qwen3vl-onnx chat`` driven through standard input, as a script or a user piping messages would."""

from __future__ import annotations

import json
import subprocess
import sys

from qwen3vl_onnx import Pipeline


def _chat(bundle, lines: list[str], *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qwen3vl_onnx.cli", "chat", str(bundle), "--temperature", "0", "--max-new-tokens", "5",
           "--ignore-eos", *flags]  # fmt: skip
    return subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)


def test_chat_turns_save_reset_load(setup, tmp_path):
    """Two turns (a picture in the first), /save, /reset, /load, a third turn: every answer is what a
    fresh call on the same history gives, the second turn reuses the first from the cache, the saved
    file is OpenAI-style JSON, and errors in a line are reported without ending the chat."""
    img, saved = setup / "img.png", tmp_path / "conv.json"
    r = _chat(setup / "bundle", [f"/image {img}", "What is it?", "And then?", "/image /no/such.png", f"/save {saved}",
                                 "/reset", f"/load {saved}", "One more.", "/quit", "never sent"])  # fmt: skip
    assert r.returncode == 2, r.stderr  # the missing picture made one line fail; the chat went on
    stats = [line for line in r.stderr.splitlines() if line.startswith("[") and "prompt tokens" in line]
    assert len(stats) == 3 and " (0 reused) " in stats[0] and " (0 reused) " not in stats[1]  # turn 2 reuses turn 1
    assert " (0 reused) " in stats[2]  # /load starts a new cache
    assert "error: /no/such.png: image file not found" in r.stderr and "[saved 4 messages to" in r.stderr

    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"][0] == {"type": "image_url", "image_url": {"url": f"file://{img.resolve()}"}}

    pipe = Pipeline.from_bundle(setup / "bundle")
    kw = dict(max_new_tokens=5, temperature=0, ignore_eos=True)
    answers = [pipe.generate(messages[:1], **kw).text, pipe.generate(messages[:3], **kw).text]
    assert [messages[1]["content"], messages[3]["content"]] == answers
    answers.append(pipe.generate([*messages, {"role": "user", "content": "One more."}], **kw).text)
    assert r.stdout == "".join(a + "\n" for a in answers)  # each answer streamed, then a newline


def test_chat_system_and_unknown_commands(setup):
    r = _chat(setup / "bundle", ["/system Answer in French.", "/nonsense", "/video clip.mp4", "/save /no/such/dir/c.json",
                                 "/load /no/such.json", "Hello"])  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: unknown command /nonsense" in r.stderr and "error: clip.mp4: video file not found" in r.stderr
    assert "error: /no/such/dir/c.json: cannot write" in r.stderr and "error: /no/such.json: cannot read" in r.stderr
    pipe = Pipeline.from_bundle(setup / "bundle")
    expected = pipe.generate([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
                             max_new_tokens=5, temperature=0, ignore_eos=True)  # fmt: skip
    assert r.stdout == expected.text + "\n"


def test_chat_with_a_video_saves_and_reloads_it(setup, tmp_path):
    """/video attaches a clip (with --video-fps); the saved conversation carries it as a video_url
    with its options, and a fresh call on the saved history gives the answer the chat gave."""
    from .conftest import make_video

    clip, saved = make_video(tmp_path / "clip.mp4", 12, 6, 64, 48), tmp_path / "conv.json"
    r = _chat(setup / "bundle", [f"/video {clip}", "What happens?", f"/save {saved}"], "--video-fps", "1")
    assert r.returncode == 0, r.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert messages[0]["content"][0] == {"type": "video_url", "video_url": {"url": f"file://{clip.resolve()}", "fps": 1.0}}
    pipe = Pipeline.from_bundle(setup / "bundle")
    fresh = pipe.generate(messages[:1], max_new_tokens=5, temperature=0, ignore_eos=True)
    assert messages[1]["content"] == fresh.text and r.stdout == fresh.text + "\n"
    assert pipe.prepare(messages[:1]).videos == [True]


def test_chat_a_failed_turn_takes_its_attachments_and_commands_say_what_they_did(setup, tmp_path):
    """/video on a bundle that takes no video: that turn fails in one line naming what was not sent,
    and the next message is answered as if it had never been attached (every later message repeated
    the error until /reset). /image, /reset and /load say what they did (they printed nothing)."""
    import shutil

    from .conftest import make_video

    bundle = shutil.copytree(setup / "bundle", tmp_path / "b")
    (bundle / "video_preprocessor_config.json").unlink()
    clip, saved = make_video(tmp_path / "clip.mp4", 12, 6, 64, 48), tmp_path / "c.json"
    r = _chat(bundle, [f"/video {clip}", "What happens?", "Hello", f"/save {saved}", f"/image {setup / 'img.png'}", "/reset",
                       f"/load {saved}"])  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("error: ") == 1, r.stderr
    assert "it does not take video (this message and its 1 attachment(s) were not sent)" in r.stderr
    fresh = Pipeline.from_bundle(bundle).generate([{"role": "user", "content": "Hello"}], max_new_tokens=5, temperature=0,
                                                  ignore_eos=True)  # fmt: skip
    assert r.stdout == fresh.text + "\n"
    for said in ("[video attached: ", "(1 video for your next message)]", "[image attached: ", "(1 image for your next",
                 "[conversation reset, 1 attachment(s) dropped]", f"[loaded 2 messages from {saved}]"):  # fmt: skip
        assert said in r.stderr, (said, r.stderr)


class _Lines:
    """Standard input for an in-process chat: the lines, then ``end`` (EOF, or an exception raised)."""

    def __init__(self, lines: list[str], end: BaseException | None = None, tty: bool = False):
        self.lines, self.end, self.tty = list(lines), end, tty

    def isatty(self) -> bool:
        return self.tty

    def readline(self) -> str:
        if self.lines:
            return self.lines.pop(0) + "\n"
        if self.end is not None:
            raise self.end
        return ""


def _run_in_process(bundle, stdin, monkeypatch=None):
    import io

    from qwen3vl_onnx.cli import _parser
    from qwen3vl_onnx.cli_chat import run_chat

    args = _parser().parse_args(["chat", str(bundle), "--temperature", "0", "--max-new-tokens", "5", "--ignore-eos"])
    out, err = io.StringIO(), io.StringIO()
    if stdin.tty and monkeypatch is not None:
        monkeypatch.setattr("builtins.input", lambda prompt="": stdin.readline().rstrip("\n"))
    code = run_chat(args, stdin, out, err)
    return code, out.getvalue(), err.getvalue()


def test_chat_ctrl_c_before_the_answer_keeps_the_picture_for_the_next_message(setup, tmp_path, monkeypatch):
    """Ctrl-C while a picture's prompt is prepared: the turn is not kept, it says so, and the picture
    goes with the next message (it was silently dropped: the next question went without it)."""
    from qwen3vl_onnx.runtime.conversation import Conversation

    send, calls = Conversation.send, []

    def interrupted_once(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return send(self, *a, **k)

    monkeypatch.setattr(Conversation, "send", interrupted_once)
    saved = tmp_path / "c.json"
    code, out, err = _run_in_process(setup / "bundle", _Lines([f"/image {setup / 'img.png'}", "What is it?", "What is it?",
                                                                f"/save {saved}"]))  # fmt: skip
    assert code == 0, err
    assert "[stopped before the answer began; the question was not kept; 1 image wait for your next message]" in err
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"][0]["type"] == "image_url" and messages[0]["content"][1]["text"] == "What is it?"


def test_chat_ctrl_c_at_the_prompt_clears_the_line_and_twice_leaves(setup, monkeypatch):
    """At an interactive prompt Ctrl-C once clears the line and says how to leave; twice in a row
    leaves with status 130 (it left with 0 at once). Piped input interrupted: 130."""
    code, out, err = _run_in_process(setup / "bundle", _Lines(["Hi"], KeyboardInterrupt(), tty=True), monkeypatch)
    assert code == 130 and "[Ctrl-C again, Ctrl-D or /quit leaves]" in err and out.count("\n") == 1, (code, out, err)
    code, _, _ = _run_in_process(setup / "bundle", _Lines(["Hi"], KeyboardInterrupt()))
    assert code == 130
