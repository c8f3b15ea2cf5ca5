"""Stopping the server (SIGTERM, as systemd, Docker and Kubernetes do): answers already running get
``--shutdown-grace`` seconds to finish, then end with an error a client can see, never a silent cut."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from .conftest import Server

H = {"Authorization": "Bearer test-key"}
LONG = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "ignore_eos": True,
        "temperature": 0}  # fmt: skip


def _stream(url: str, body: dict, out: dict) -> None:
    """Each event's arrival time and data, until the server ends the stream."""
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=H, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.setdefault("events", []).append((time.monotonic(), line[6:]))


def test_running_answers_get_the_grace_then_an_error_not_a_cut(tiny_one):
    """A 4000-token stream and a 4000-token whole answer are running when SIGTERM comes: the stream
    keeps flowing through the 1 s grace, then gets an error event with code server_shutdown and
    [DONE]; the whole answer gets a 503 in OpenAI's error shape; the process is gone soon after.
    (Before, sse-starlette closed every stream the moment the signal came, with no error, and the
    whole answer's connection was dropped after uvicorn's 5 s.)"""
    s = Server(tiny_one.bundle, "--ctx-size", "4096", "--shutdown-grace", "1")
    try:
        streamed: dict = {}
        whole: dict = {}
        t1 = threading.Thread(target=_stream, args=(s.url, LONG, streamed))
        t2 = threading.Thread(target=lambda: whole.update(r=httpx.post(s.url + "/v1/chat/completions", json=LONG, headers=H,
                                                                       timeout=60)))  # fmt: skip
        t1.start()
        t2.start()
        while len(streamed.get("events", [])) < 20:
            time.sleep(0.01)
        time.sleep(0.2)  # the whole answer is decoding too
        sent = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        t1.join(30)
        t2.join(30)
        s.proc.wait(30)
        gone = time.monotonic() - sent
    finally:
        s.close()
    events = streamed["events"]
    assert events[-1][1] == "[DONE]"
    error = json.loads(events[-2][1])["error"]
    assert error["code"] == "server_shutdown" and "grace" in error["message"], error
    after = [t for t, data in events if t > sent + 0.5 and "content" in data]
    assert after, "the stream stopped at the signal instead of running through the grace"
    assert events[-2][0] - sent < 3, events[-2][0] - sent
    r = whole["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutdown", r.text
    assert gone < 8, gone


def test_an_answer_that_fits_in_the_grace_ends_normally(tiny_one):
    """A stream running when SIGTERM comes finishes whole (every token, finish_reason, usage,
    [DONE]) under the default grace, while the server takes no new request."""
    s = Server(tiny_one.bundle, "--ctx-size", "512")
    try:
        streamed: dict = {}
        body = {**LONG, "max_tokens": 300, "stream_options": {"include_usage": True}}
        t = threading.Thread(target=_stream, args=(s.url, body, streamed))
        t.start()
        while not streamed.get("events"):
            time.sleep(0.005)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            refused = httpx.get(s.url + "/health", timeout=5).status_code != 200
        except httpx.HTTPError:
            refused = True
        t.join(30)
        s.proc.wait(30)
    finally:
        s.close()
    data = [d for _, d in streamed["events"]]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["usage"]["completion_tokens"] == 300, data[-2]
    assert json.loads(data[-3])["choices"][0]["finish_reason"] == "length", data[-3]
    assert refused
