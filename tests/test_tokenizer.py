"""The offline-built Qwen tokenizer is the real one."""

from __future__ import annotations

import random

import tiktoken

from qwen3vl_onnx.demo.tokenizer import PATTERN, SPECIAL_TOKENS, build_tokenizer, load_ranks


def test_hello_world_and_specials():
    tk = build_tokenizer()
    assert tk.encode("Hello, world!").ids == [9707, 11, 1879, 0]
    assert [tk.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(151643, 151669))
    ids = tk.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>").ids
    assert ids[:6] == [151644, 872, 198, 151652, 151655, 151653] and ids[-1] == 151645
    assert tk.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_agrees_with_tiktoken_on_mixed_text():
    tk = build_tokenizer()
    ref = tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=load_ranks(), special_tokens={})
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789 \n\t.,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|éüßñ中文日本語한국어😀🎉Ω"
    texts = ["Hello, world!", "  leading spaces\n\n\ttabs\r\n", "don't I'LL we've 1234567", "naïve café — “quotes”"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 80))) for _ in range(300)]
    for t in texts:
        assert tk.encode(t).ids == ref.encode(t), t


def test_token_bytes_are_each_tokens_own_bytes():
    """A token holding part of a character decodes to U+FFFD as text; its bytes are tiktoken's for
    the same rank (125001 is the first two bytes of a three-byte character), specials their text."""
    from qwen3vl_onnx.runtime.text_stream import TokenBytes

    tk = build_tokenizer()
    ref = tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=load_ranks(), special_tokens={})
    token_bytes = TokenBytes(tk)
    assert tk.decode([125001]) == "\ufffd" and token_bytes(125001) == bytes([234, 153])
    for i in [*random.Random(1).sample(range(151643), 1000), 0, 220, 198, 125001, 151642]:
        assert token_bytes(i) == ref.decode_single_token_bytes(i), i
    assert token_bytes(151644) == b"<|im_start|>" and token_bytes(151657) == b"<tool_call>"
    text = "𝔘𝔫𝔦 Ꙛꙛ 中文 😀"
    assert b"".join(token_bytes(i) for i in tk.encode(text).ids) == text.encode()
