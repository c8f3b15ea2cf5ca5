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
    ([{"role": "user", "content": [{"type": "video"}]}], "video part needs a video"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}], "video_url part needs a url"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "http://example.com/v.mp4"}}]}], "not fetched"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,%%"}}]}], "data URL"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "unsupported message content part: 'audio'"),
    ([{"role": "user", "content": ["just a string"]}], "unsupported message content part"),
])  # fmt: skip
def test_malformed_messages_are_one_line_errors(messages, message):
    with pytest.raises(UserError, match=message) as e:
        split_messages(messages)
    assert "\n" not in str(e.value)


def test_video_parts_carry_their_options():
    from qwen3vl_onnx.runtime.video import VideoRequest

    parts = [{"type": "video", "video": "a.mp4", "fps": 1, "max_frames": 8, "video_start": 2.0},
             {"type": "video_url", "video_url": {"url": "file:///tmp/b.mp4", "max_pixels": 4096}}]  # fmt: skip
    out, videos = split_messages([{"role": "user", "content": parts}])
    assert videos == [VideoRequest("a.mp4", fps=1, max_frames=8, start=2.0), VideoRequest("/tmp/b.mp4", max_pixels=4096)]
    assert out[0]["content"] == [{"type": "video"}, {"type": "video"}]


def test_null_content_and_file_urls_are_taken():
    parts = [{"type": "image_url", "image_url": {"url": "file:///tmp/a.png"}}, {"type": "text", "text": "?"}]
    out, images = split_messages([{"role": "assistant", "content": None}, {"role": "user", "content": parts}])
    assert out[0]["content"] == "" and images == ["/tmp/a.png"] and out[1]["content"][0] == {"type": "image"}
