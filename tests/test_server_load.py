"""A bounded load test: 8 clients for 10 s against 8 slots on the tiny bundle, streaming and not,
some with pictures, some leaving early; every request answered, none failed, the server's
memory steady, and a final request answered as it would be alone."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from qwen3vl_onnx import Pipeline

from .conftest import Server, picture
from .test_server_api import data_url

CLIENTS, SECONDS = 8, 10


@pytest.fixture(scope="module")
def server(tiny_one):
    s = Server(tiny_one.bundle, "--ctx-size", "512", "--parallel", str(CLIENTS), "--metrics")
    yield s
    s.close()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_eight_clients_for_ten_seconds(server, tiny_one):
    images = [data_url(picture(48 + 8 * i, 40, seed=i)) for i in range(3)]
    h = {"Authorization": f"Bearer {server.api_key}"}
    done, errors = [0] * CLIENTS, []
    stop = time.monotonic() + SECONDS

    def client(c: int) -> None:
        rng = random.Random(c)
        with httpx.Client(base_url=server.url, headers=h, timeout=120) as http:
            while time.monotonic() < stop:
                content: list | str = f"client {c} says {rng.random():.3f}"
                if rng.random() < 0.3:
                    content = [{"type": "image_url", "image_url": {"url": rng.choice(images)}}, {"type": "text", "text": "Hm?"}]
                body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": rng.randint(1, 40),
                        "temperature": rng.choice([0, 0.8]), "stream": rng.random() < 0.5}  # fmt: skip
                try:
                    if body["stream"]:
                        with http.stream("POST", "/v1/chat/completions", json=body) as r:
                            lines = []
                            for line in r.iter_lines():
                                lines.append(line)
                                if rng.random() < 0.05:
                                    break  # a client that leaves early
                            ok = r.status_code == 200 and (lines[-1] == "data: [DONE]" or len(lines) < 200)
                    else:
                        r = http.post("/v1/chat/completions", json=body)
                        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                    if not ok:
                        errors.append((r.status_code, r.text[:200] if not body["stream"] else ""))
                    done[c] += 1
                except httpx.HTTPError as e:
                    errors.append(repr(e))

    warm = {"model": "tiny", "messages": [{"role": "user", "content": "warm"}], "max_tokens": 2}
    httpx.post(server.url + "/v1/chat/completions", headers=h, json=warm, timeout=60)
    rss0 = _rss_mb(server.proc.pid)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert all(n >= 3 for n in done), done
    assert _rss_mb(server.proc.pid) < rss0 * 1.5 + 200, (rss0, _rss_mb(server.proc.pid))
    slots = httpx.get(server.url + "/slots", headers=h).json()
    assert len(slots) == CLIENTS and not any(s["busy"] for s in slots)
    msg = [{"role": "user", "content": "After the storm."}]
    r = httpx.post(server.url + "/v1/chat/completions", headers=h, timeout=60,
                   json={"model": "tiny", "messages": msg, "max_tokens": 10, "temperature": 0, "ignore_eos": True})  # fmt: skip
    ref = Pipeline.from_bundle(tiny_one.bundle).generate(msg, max_new_tokens=10, temperature=0, ignore_eos=True)
    assert r.json()["choices"][0]["message"]["content"] == ref.text
