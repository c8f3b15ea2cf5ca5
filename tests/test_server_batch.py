"""``qwen3vl-onnx batch``: OpenAI batch files through the server's engine. Answers equal
Pipeline.generate (up to the batched near-tie the server tests allow for, see
``test_server_engine._same_or_near_tie``), bad lines become error lines and the job goes on, and a
killed run started again answers every request exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from qwen3vl_onnx import Pipeline

from .conftest import one_line_error, picture
from .test_server_api import data_url
from .test_server_engine import _same_or_near_tie


def _line(cid: str, content, n: int = 6, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2, **extra}  # fmt: skip
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _write(path, lines) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def _read(path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for raw in path.read_text().splitlines():
        d = json.loads(raw)
        key = d["custom_id"] if d["custom_id"] is not None and (d.get("error") or {}).get("code") != "duplicate_custom_id" \
            else f"line{d['error']['line']}"  # fmt: skip
        assert key not in out, f"{key} answered twice"
        out[key] = d
    return out


def _batch(bundle, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen3vl_onnx.cli", "batch", str(bundle), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_answers_bad_lines_and_usage(tiny_one, tmp_path):
    img = picture(64, 48, seed=2)
    good = [_line(f"q{i}", f"Question {i}: " + "more " * i, n=4 + i) for i in range(4)]
    good.append(_line("pic", [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": "What?"}]))
    bad = ["{not json", json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
           json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/chat/completions"}),
           json.dumps({**_line("q0", "again"), "custom_id": "q0"}),
           json.dumps(_line("badimg", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])),
           json.dumps({**_line("url", "x"), "url": "/v1/embeddings"})]  # fmt: skip
    _write(tmp_path / "in.jsonl", good[:2] + bad + good[2:])
    with open(tmp_path / "in.jsonl", "ab") as f:
        f.write(b'{"custom_id": "\xff\xfe"}\n')  # not UTF-8
    r = _batch(tiny_one.bundle, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--parallel", "3")
    assert r.returncode == 1, r.stderr  # some lines failed
    assert "5 done, 7 failed, 0 skipped" in r.stderr.splitlines()[-1]
    out = _read(tmp_path / "out.jsonl")
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    for line in good:
        got = out[line["custom_id"]]
        assert got["error"] is None and got["response"]["status_code"] == 200 and got["id"].startswith("batch_req_")
        body = got["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == line["body"]["max_tokens"]
        content = line["body"]["messages"][0]["content"]
        local = content if isinstance(content, str) else [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]
        ref = pipe.generate([{"role": "user", "content": local}], max_new_tokens=line["body"]["max_tokens"], temperature=0,
                            ignore_eos=True, logprobs=2)  # fmt: skip
        _same_or_near_tie(body, ref, pipe.tokenizer)
    codes = {k: (v["error"]["code"], v["error"]["line"]) for k, v in out.items() if v["error"]}
    assert codes == {
        "line3": ("invalid_json", 3),
        "line4": ("missing_custom_id", 4),
        "nobody": ("missing_body", 5),
        "line6": ("duplicate_custom_id", 6),
        "badimg": (codes["badimg"][0], 7),
        "url": ("invalid_url", 8),
        "line12": ("invalid_json", 12),
    }
    assert out["badimg"]["response"]["status_code"] == 400 and "cannot read image" in out["badimg"]["error"]["message"]
    # a second run asks nothing again
    r = _batch(tiny_one.bundle, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert r.returncode == 0 and "0 done, 0 failed, 12 skipped" in r.stderr, r.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 12


def test_killed_runs_resume_until_every_request_is_answered_once(tiny_one, tmp_path):
    """SIGKILL at two points, a torn last line written after each (what a kill in mid-write leaves),
    restart: every request ends answered exactly once, each answer as Pipeline.generate's.
    (scripts/batch_resume.py does this five times at random moments on a longer job.)"""
    lines = [_line(f"r{i}", f"Tell me about item {i}", n=48) for i in range(12)]
    _write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    counts = []
    for at_least in (3, 7):  # killed once this many lines are out, whatever it is doing then
        p = subprocess.Popen([sys.executable, "-m", "qwen3vl_onnx.cli", "batch", str(tiny_one.bundle), str(tmp_path / "in.jsonl"),
                              str(out), "--parallel", "2"], stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < at_least):
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
        counts.append(out.read_text().count("\n"))
        assert counts[-1] < len(lines), "the run ended before it was killed"
        with open(out, "a") as f:
            f.write('{"id": "batch_req_torn", "custom_id": "r')
    r = _batch(tiny_one.bundle, tmp_path / "in.jsonl", out, "--parallel", "2")
    assert r.returncode == 0, r.stderr
    got = _read(out)
    assert sorted(got) == sorted(f"r{i}" for i in range(12))
    skipped = int(r.stderr.splitlines()[-1].split(" failed, ")[1].split(" skipped")[0])
    assert skipped == counts[-1], (skipped, counts)  # what the killed runs had answered is kept, not asked again
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    for i, line in enumerate(lines):
        ref = pipe.generate(line["body"]["messages"], max_new_tokens=48, temperature=0, ignore_eos=True, logprobs=2)
        _same_or_near_tie(got[f"r{i}"]["response"]["body"], ref, pipe.tokenizer)


def test_a_full_queue_is_waited_for_not_answered(tiny_one, tmp_path):
    """More requests than slots and queue together: each waits its turn, none gets a 429 line."""
    _write(tmp_path / "in.jsonl", [_line(f"q{i}", f"Item {i}", n=8) for i in range(12)])
    r = _batch(tiny_one.bundle, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--parallel", "2", "--queue-size", "1")
    assert r.returncode == 0 and "12 done, 0 failed" in r.stderr, r.stderr


def test_images_folder_shortcut(tiny_one, tmp_path):
    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    picture(40, 40, seed=1).save(pics / "a.png")
    picture(56, 40, seed=2).save(pics / "sub" / "b.jpg")
    (pics / "notes.txt").write_text("not a picture")
    r = _batch(tiny_one.bundle, tmp_path / "o.jsonl", "--images", pics, "--prompt", "What is it?", "--max-tokens", "5",
               "--temperature", "0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = _read(tmp_path / "o.jsonl")
    assert sorted(out) == ["a.png", "sub/b.jpg"]
    assert all(v["response"]["body"]["usage"]["completion_tokens"] <= 5 for v in out.values())
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    for name, v in out.items():  # each request carried its own picture
        asked = [
            {"role": "user", "content": [{"type": "image", "image": str(pics / name)}, {"type": "text", "text": "What is it?"}]}
        ]
        assert v["response"]["body"]["usage"]["prompt_tokens"] == len(pipe.prepare(asked).ids)


@pytest.mark.parametrize(
    "args,needles",
    [
        (["in.jsonl", "--images", "pics"], ["not both"]),
        ([], ["not neither"]),
        (["missing.jsonl"], ["missing.jsonl", "not found"]),
        (["in.jsonl", "--ray-actors", "2"], ["--ray-actors needs --ray"]),
    ],  # fmt: skip
    ids=["both", "neither", "missing_input", "actors_without_ray"],
)
def test_bad_invocations_are_one_line_errors(setup, tmp_path, args, needles):
    (tmp_path / "in.jsonl").write_text("")
    (tmp_path / "pics").mkdir()
    r = subprocess.run([sys.executable, "-m", "qwen3vl_onnx.cli", "batch", str(setup / "bundle"), *args, "out.jsonl"],
                       capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    one_line_error(r, *needles)
