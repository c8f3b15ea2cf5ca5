"""runtime/chat.py: malformed OpenAI-style messages are one-line errors, never tracebacks."""

from __future__ import annotations

import pytest

from qwen3vl_onnx.errors import UserError
from qwen3vl_onnx.runtime.chat import split_messages


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"content": "hi"}], "needs a role"),
    (["hi"], "needs a role"),
    ([{"role": "user", "content": 5}], "text or a list of parts, got int"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "image_url part needs a url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}], "needs a url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "https://example.com/a.png"}]}], "not fetched"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,xx"}}]}], "data URL"),
    ([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}], "unsupported message content part: 'video'"),
    ([{"role": "user", "content": ["just a string"]}], "unsupported message content part"),
])  # fmt: skip
def test_malformed_messages_are_one_line_errors(messages, message):
    with pytest.raises(UserError, match=message) as e:
        split_messages(messages)
    assert "\n" not in str(e.value)


def test_null_content_and_file_urls_are_taken():
    parts = [{"type": "image_url", "image_url": {"url": "file:///tmp/a.png"}}, {"type": "text", "text": "?"}]
    out, images = split_messages([{"role": "assistant", "content": None}, {"role": "user", "content": parts}])
    assert out[0]["content"] == "" and images == ["/tmp/a.png"] and out[1]["content"][0] == {"type": "image"}
