"""The chat page in headless Chromium (Debian's package, driven by Playwright's Python package; never a
downloaded browser): a real question to the shapes model, the key dialog, stop, reload, reasoning,
untrusted text, boxes at the right pixels, a phone-width screen. Answers the random models cannot
give (HTML, a grounding answer) come from a recorded stream the test serves in place of the API."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import httpx
import pytest

from .conftest import Server, picture

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-quic"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "these tests need Debian's chromium: apt-get install chromium (.ci/run does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shapes_server(shapes):
    s = Server(shapes[1](), "--ctx-size", "512", api_key="page-key")
    yield s
    s.close()


class Page:
    """A page on ``url`` that records script errors and every request it makes."""

    def __init__(self, browser, url: str, **context):
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # an HTTP error status is logged as "Failed to load resource": a network log, not a script error
        self.page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
                     and self.errors.append(m.text))  # fmt: skip
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = url

    def open(self, key: str | None = None) -> None:
        self.page.goto(self.url + "/")
        if key is not None:
            self.page.wait_for_selector("#key-dialog[open]")
            self.page.fill("#key", key)
            self.page.click("#key-dialog button")

    def ask(self, text: str, files: list[Path] = ()) -> None:  # type: ignore[assignment]
        if files:
            self.page.set_input_files("#file", [str(f) for f in files])
            self.page.wait_for_selector("#attachments img")
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def settings(self, **values: str) -> None:
        self.page.click("#open-settings")
        for name, value in values.items():
            self.page.fill(f"#{name}", value)
        self.page.click("#settings button")

    def check_clean(self, tmp_path: Path, name: str) -> None:
        """No script error, no request outside this server, and a screenshot with something in it."""
        shot = tmp_path / f"{name}.png"
        self.page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 8000, "an empty screenshot"
        assert not self.errors, self.errors
        outside = [u for u in self.requests if not u.startswith((self.url, "data:", "blob:"))]
        assert not outside, outside
        self.context.close()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_a_question_about_a_picture_equals_the_api_and_survives_a_reload(browser, shapes_server, tmp_path):
    from playwright.sync_api import expect

    from qwen3vl_onnx.shapes import task

    item = next(i for i in task.eval_items(30) if len(i.images) == 1)
    item.images[0].save(tmp_path / "shapes.png")
    page = Page(browser, shapes_server.url)
    page.open(key="page-key")  # the server needs a key: the page asks once, then works
    expect(page.page.locator("#model-name")).to_have_text("tiny")
    page.settings(temperature="0")
    page.ask(item.question, [tmp_path / "shapes.png"])
    page.page.wait_for_selector(".msg.assistant .stats", timeout=60_000)
    shown = page.page.locator(".msg.assistant p").first.inner_text()
    content = [{"type": "image_url", "image_url": {"url": data_url(tmp_path / "shapes.png")}},
               {"type": "text", "text": item.question}]  # fmt: skip
    body = {"model": "tiny", "temperature": 0, "messages": [{"role": "user", "content": content}]}
    api = httpx.post(shapes_server.url + "/v1/chat/completions", json=body, timeout=60,
                     headers={"Authorization": "Bearer page-key"}).json()  # fmt: skip
    assert shown == api["choices"][0]["message"]["content"] and "tokens" in page.page.inner_text(".msg.assistant .stats")
    assert shown.strip().lower() == item.answer  # and the trained model knows
    page.page.reload()
    expect(page.page.locator("#history button").first).to_have_text(item.question[:60])
    expect(page.page.locator(".msg.user p")).to_have_text(item.question)  # the conversation is still there
    assert page.page.locator(".msg.user img").count() == 1
    assert httpx.get(shapes_server.url + "/v1/models").status_code == 401  # the page did not open the API
    page.check_clean(tmp_path, "question")


def _recorded(page, text: str) -> None:
    """Answer the page's next completion with a recorded stream whose content is ``text``."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": text[k : k + 7]}, "finish_reason": None}]}
              for k in range(0, len(text), 7)]  # fmt: skip
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}
    body = "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in [*chunks, usage]) + "data: [DONE]\r\n\r\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=body, content_type="text/event-stream"))


def test_untrusted_text_stays_text_and_boxes_land_on_their_pixels(browser, shapes_server, tmp_path):
    picture(400, 200, seed=3).save(tmp_path / "wide.png")
    page = Page(browser, shapes_server.url)
    page.open(key="page-key")
    _recorded(page.page, 'Look: <img src=x onerror="document.title=\'pwned\'"> <script>document.title="pwned"</script> **bold**')
    page.ask("Say something.")
    page.page.wait_for_selector(".msg.assistant .stats")
    assert page.page.locator(".msg.assistant img, .msg.assistant script").count() == 0
    assert "<img src=x" in page.page.inner_text(".msg.assistant") and page.page.title() != "pwned"
    assert page.page.locator(".msg.assistant strong").inner_text() == "bold"  # Markdown, as nodes
    page.page.unroute("**/v1/chat/completions")
    error = json.dumps({"error": {"message": "image of 9000x9000 is over the limit", "type": "invalid_request_error"}})
    page.page.route("**/v1/chat/completions",
                    lambda route: route.fulfill(status=400, body=error, content_type="application/json"))  # fmt: skip
    page.ask("A huge picture?")
    page.page.wait_for_selector(".msg.error")
    assert "image of 9000x9000 is over the limit" in page.page.inner_text(".msg.error")  # shown, not swallowed
    page.page.unroute("**/v1/chat/completions")
    marks = '[{"bbox_2d": [100, 250, 600, 750], "label": "square"}, {"point_2d": [500, 500], "label": "c"}]'
    _recorded(page.page, f"```json\n{marks}\n```")
    page.ask("Where is the square?", [tmp_path / "wide.png"])
    page.page.wait_for_selector(".picture svg rect")
    rect = page.page.locator(".msg.user .picture svg rect").last
    assert [float(rect.get_attribute(a)) for a in ("x", "y", "width", "height")] == [40, 50, 200, 100]  # in 400x200 px
    img = page.page.locator(".msg.user .picture img").last.bounding_box()
    drawn = rect.bounding_box()
    scale = img["width"] / 400
    assert abs(drawn["x"] - (img["x"] + 40 * scale)) < 3 and abs(drawn["width"] - 200 * scale) < 4  # on screen, where it belongs
    page.page.click(".toggle-marks")
    assert not page.page.locator(".msg.user .picture svg").last.is_visible()
    page.check_clean(tmp_path, "boxes")


def test_the_page_reads_boxes_as_the_python_parser(browser, shapes_server, tmp_path):
    """grounding.js and runtime/grounding.py on the same recorded answers: the same marks."""
    cases = json.loads((Path(__file__).parent / "data" / "grounding_answers.json").read_text())
    page = Page(browser, shapes_server.url)
    page.open(key="page-key")
    got = page.page.evaluate("async (cases) => { const g = await import('/ui/grounding.js'); "
                             "return cases.map((c) => g.findMarks(c.text, c.sizes)); }", cases)  # fmt: skip
    assert got == [c["marks"] for c in cases]
    page.check_clean(tmp_path, "parser")


def test_a_phone_width_screen_has_no_sideways_scroll(browser, shapes_server, tmp_path):
    page = Page(browser, shapes_server.url, viewport={"width": 375, "height": 740})
    page.open(key="page-key")
    _recorded(page.page, "A long line without spaces " + "x" * 400)
    page.ask("Hi " + "word " * 80)
    page.page.wait_for_selector(".msg.assistant .stats")
    assert page.page.evaluate("() => document.documentElement.scrollWidth") <= 375
    assert not page.page.locator("#sidebar").is_visible() or page.page.locator("#sidebar").bounding_box()["x"] < 0
    page.page.click("#toggle-sidebar")
    page.check_clean(tmp_path, "phone")


@pytest.fixture(scope="module")
def thinking_server(tiny_one, tmp_path_factory):
    from qwen3vl_onnx.demo.checkpoint import chat_template

    bundle = shutil.copytree(tiny_one.bundle, tmp_path_factory.mktemp("ui") / "thinking")
    tpl = chat_template().replace("{{- '<|im_start|>assistant\\n' -}}", "{{- '<|im_start|>assistant\\n<think>\\n' -}}")
    (bundle / "chat_template.jinja").write_text(tpl)
    s = Server(bundle, "--ctx-size", "2048", "--parallel", "1", api_key=None)
    yield s
    s.close()


def test_reasoning_is_collapsed_apart_and_stop_frees_the_slot(browser, thinking_server, tmp_path):
    """A Thinking template's random answer is all reasoning (no </think>): shown collapsed; Stop
    cancels the request and the server's only slot is free again."""
    import time

    page = Page(browser, thinking_server.url)
    page.open()
    page.ask("Think about it.")
    page.page.wait_for_selector(".msg.assistant details.reasoning")
    assert page.page.locator("#stop").is_visible()
    time.sleep(0.5)
    page.page.click("#stop")
    page.page.wait_for_selector(".msg.assistant .stats, .msg.assistant p:text('stopped')")
    details = page.page.locator(".msg.assistant details.reasoning")
    assert details.get_attribute("open") is None and details.locator("summary").inner_text() == "Reasoning"
    deadline = time.monotonic() + 20
    while any(s["busy"] for s in httpx.get(thinking_server.url + "/slots").json()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(s["busy"] for s in httpx.get(thinking_server.url + "/slots").json())
    assert page.page.locator("#send").is_visible()
    page.check_clean(tmp_path, "reasoning")
