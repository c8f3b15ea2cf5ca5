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
