"""The app's own behaviour, in process (no engine needed): 503 while loading or after a failed
load, the API key on every route but /health, errors in OpenAI's shape, media rules."""

from __future__ import annotations

import base64
import io
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from qwen3vl_onnx.server.app import create_app
from qwen3vl_onnx.server.media import MediaError, confined_path, pipeline_messages
from qwen3vl_onnx.server.schemas import Message
from qwen3vl_onnx.server.settings import ServerSettings


def test_loading_and_failed_loading_answer_503():
    release = threading.Event()

    def slow(_metrics):
        release.wait(10)
        raise RuntimeError("bundle.onnx is damaged")

    app = create_app(ServerSettings("m", api_key="k"), slow)
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                   headers={"Authorization": "Bearer k"})  # fmt: skip
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        assert c.get("/v1/models").status_code == 401  # the key is checked before anything else
        release.set()
        for _ in range(100):
            r = c.get("/health")
            if "failed" in r.json()["error"]["message"]:
                break
            threading.Event().wait(0.05)
        assert r.status_code == 503
        assert "the model failed to load: RuntimeError: bundle.onnx is damaged" in r.json()["error"]["message"]
        assert c.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 404  # off without --metrics


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_media_rules(tmp_path):
    inside = tmp_path / "media"
    inside.mkdir()
    (inside / "a.png").write_bytes(base64.b64decode(_png(8, 8).split(",")[1]))
    s = ServerSettings("m", allowed_media_dir=inside, max_image_pixels=10_000)
    assert confined_path(f"file://{inside}/sub/../a.png", s) == (inside / "a.png").resolve()
    with pytest.raises(MediaError) as e:
        confined_path("file://remotehost/a.png", s)
    assert e.value.status == 400
    big = [Message(role="user", content=[{"type": "image_url", "image_url": {"url": _png(200, 100)}}])]
    with pytest.raises(MediaError, match="image of 200x100 is over the limit of 0.01 million pixels"):
        pipeline_messages(big, s)
    video = [
        Message(role="user", content=[{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA", "max_frames": 9}}])
    ]
    with pytest.raises(MediaError, match="max_frames 9 is over the limit of 8"):
        pipeline_messages(video, s, frame_cap=8)
    out = pipeline_messages([Message(role="developer", content="Be nice.")], s)
    assert out == [{"role": "system", "content": "Be nice."}]


def test_serve_refuses_bad_options_in_one_line(run_cli, setup, tmp_path):
    from .conftest import one_line_error

    one_line_error(run_cli("serve", tmp_path / "nothing"), "not a bundle")
    one_line_error(
        run_cli("serve", setup / "bundle", "--allowed-media-dir", tmp_path / "nope"), "--allowed-media-dir is not a directory"
    )
    one_line_error(run_cli("serve", setup / "bundle", "--api-key-file", tmp_path / "key.txt"), "cannot read the API key")
    (tmp_path / "empty.txt").write_text("\n")
    one_line_error(run_cli("serve", setup / "bundle", "--api-key-file", tmp_path / "empty.txt"), "API key file is empty")
    one_line_error(run_cli("serve", setup / "bundle", "--parallel", "0"), "--parallel: must be >= 1")


def test_a_cancelled_wait_for_the_next_event_leaves_no_task_behind():
    """A stream whose client leaves is cancelled while it waits for its job's next event: the wait
    on the event queue must go with it (left pending, asyncio later logged 'Task was destroyed but
    it is pending!' for 2 of 3 dropped streams)."""
    import asyncio

    from qwen3vl_onnx.server.run import Drain

    async def scenario() -> set:
        drain = Drain(5.0)
        drain.bind()
        events: asyncio.Queue = asyncio.Queue()
        waiter = asyncio.ensure_future(drain.next(events))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0)
        left = {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}
        events.put_nowait("after")  # the next event goes to the next reader, not to a forgotten one
        assert await asyncio.wait_for(drain.next(events), 5) == "after"
        return left

    assert asyncio.run(scenario()) == set()


def test_the_chat_page_is_served_with_its_policy_and_can_be_turned_off():
    """GET / and /ui/*: content types, no caching of stale code, a policy that allows this origin
    only and no inline script; open without the key while the API keeps it; --no-ui: gone."""
    from qwen3vl_onnx.server.ui import FILES

    app = create_app(ServerSettings("m", api_key="k"), lambda _m: threading.Event().wait(30))
    with TestClient(app) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
        assert 'src="/ui/app.js"' in page.text and "http" not in page.text.split("<body>")[0].replace("http-equiv", "")
        for name, kind in FILES.items():
            r = c.get(f"/ui/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
            assert r.headers["cache-control"] == "no-cache"
        assert c.get("/ui/secret.txt").status_code == 404 and c.get("/ui/%2E%2E%2Fapp.py").status_code == 404
        assert c.get("/v1/models").status_code == 401
    off = create_app(ServerSettings("m", ui=False), lambda _m: threading.Event().wait(30))
    with TestClient(off) as c:
        assert c.get("/").status_code == 404 and c.get("/ui/app.js").status_code == 404
