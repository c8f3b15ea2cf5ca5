"""``qwen3vl-onnx serve`` through the official ``openai`` client: every answer equals what
``Pipeline.generate`` gives for the same messages and parameters (greedy, or seeded sampling)."""

from __future__ import annotations

import base64
import io

import pytest

from qwen3vl_onnx import Pipeline

from .conftest import Server, make_video, picture, transformers_prompt_ids

GREEDY = dict(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def server(tiny_one, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    picture(48, 64, seed=7).save(media / "pic.png")
    s = Server(tiny_one.bundle, "--ctx-size", "1024", "--metrics", "--allowed-media-dir", str(media))
    s.media = media
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipe(tiny_one) -> Pipeline:
    return Pipeline.from_bundle(tiny_one.bundle)


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _ours(pipe, messages, media=None, **kw):
    """Pipeline.generate with the API's names mapped, and the messages' image URLs decoded as the server does."""
    from qwen3vl_onnx.server.media import pipeline_messages
    from qwen3vl_onnx.server.schemas import Message
    from qwen3vl_onnx.server.settings import ServerSettings

    msgs = pipeline_messages([Message(**m) for m in messages], ServerSettings("tiny", allowed_media_dir=media), 16)
    kw["max_new_tokens"] = kw.pop("max_tokens")
    return pipe.generate(msgs, **kw)


def test_completion_and_stream_equal_the_pipeline(client, pipe):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    ref = _ours(pipe, messages, ignore_eos=True, **GREEDY)
    r = client.chat.completions.create(model="tiny", messages=messages, extra_body={"ignore_eos": True}, **GREEDY)
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, 8)
    assert r.usage.total_tokens == ref.prompt_tokens + 8 and r.usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}, **GREEDY))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    # the same conversation again: its prompt comes from a slot's cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= ref.prompt_tokens - 1


def test_image_and_video_data_urls_and_file_urls(client, pipe, server, tmp_path):
    clip = make_video(tmp_path / "v.mp4", 10, 5, 64, 48)
    video_url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": data_url(picture(64, 40, seed=3))}},
               {"type": "video_url", "video_url": {"url": video_url, "fps": 2}},
               {"type": "image_url", "image_url": {"url": f"file://{server.media / 'pic.png'}"}},
               {"type": "text", "text": "What do you see?"}]  # fmt: skip
    messages = [{"role": "user", "content": content}]
    r = client.chat.completions.create(model="tiny", messages=messages, extra_body={"ignore_eos": True}, **GREEDY)
    ref = _ours(pipe, messages, server.media, ignore_eos=True, **GREEDY)
    assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens == ref.prompt_tokens
    assert pipe.prepare([{"role": "user", "content": [{"type": "video", "video": str(clip)}]}]).videos == [True]


def test_tokenize_renders_videos_and_images_as_transformers(server, tiny_one, tmp_path):
    """What the server prefills for a video between two images is transformers' prompt, token for token."""
    import httpx
    from transformers import AutoProcessor

    clip = make_video(tmp_path / "v.mp4", 14, 7, 80, 48)
    video_url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    a, b = picture(64, 40, seed=3), picture(40, 56, seed=4)
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "video_url", "video_url": {"url": video_url}},
               {"type": "image_url", "image_url": {"url": data_url(b)}},
               {"type": "text", "text": "Which came first?"}]  # fmt: skip
    r = httpx.post(server.url + "/tokenize", headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60,
                   json={"messages": [{"role": "user", "content": content}]})  # fmt: skip
    assert r.status_code == 200, r.text
    processor = AutoProcessor.from_pretrained(str(tiny_one.checkpoint))
    parts = [{"type": "image", "image": a}, {"type": "video", "video": str(clip)}, {"type": "image", "image": b},
             {"type": "text", "text": "Which came first?"}]  # fmt: skip
    assert r.json()["tokens"] == transformers_prompt_ids(processor, [{"role": "user", "content": parts}], [(clip, None)])


def test_stop_strings_seeds_and_logprobs(client, pipe):
    messages = [{"role": "user", "content": "Count from one to ten."}]
    free = _ours(pipe, messages, temperature=0, max_tokens=12, ignore_eos=True).text
    stop = free[3:5]
    r = client.chat.completions.create(model="tiny", messages=messages, stop=[stop], temperature=0, max_tokens=12,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].message.content == free[: free.index(stop)] and r.choices[0].finish_reason == "stop"

    sampled = dict(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234)
    a = client.chat.completions.create(model="tiny", messages=messages, extra_body={"ignore_eos": True}, **sampled)
    b = client.chat.completions.create(model="tiny", messages=messages, extra_body={"ignore_eos": True}, **sampled)
    ref = _ours(pipe, messages, ignore_eos=True, **sampled)
    assert a.choices[0].message.content == b.choices[0].message.content == ref.text

    r = client.chat.completions.create(model="tiny", messages=messages, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True}, **GREEDY)  # fmt: skip
    ref = _ours(pipe, messages, ignore_eos=True, logprobs=3, **GREEDY)
    got = r.choices[0].logprobs.content
    assert len(got) == 8 and all(len(t.top_logprobs) == 3 for t in got)
    for g, want in zip(got, ref.logprobs, strict=True):
        assert g.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert g.top_logprobs[0].logprob >= g.logprob - 1e-6  # greedy: the chosen token is the likeliest


def test_logprob_bytes_of_a_partial_character(client, pipe):
    """Token 125001 is the first two bytes of a three-byte character: its text is U+FFFD, its bytes
    are its own (what a client rebuilds the character from), in the entry and among the alternatives."""
    messages = [{"role": "user", "content": "Say something."}]
    for stream in (False, True):
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, logprobs=True, top_logprobs=2,
                                           logit_bias={"125001": 100}, stream=stream)  # fmt: skip
        if stream:
            entries = [e for c in r if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
        else:
            entries = r.choices[0].logprobs.content
        assert len(entries) == 1 and entries[0].bytes == [234, 153] and entries[0].token == "\ufffd"
        assert entries[0].top_logprobs[0].bytes == [234, 153]


def test_thinking_checkpoint_returns_reasoning_apart(tiny_one, tmp_path):
    """A template opening <think>: what comes before </think> is reasoning_content, whole and streamed."""
    import shutil

    from openai import OpenAI

    from qwen3vl_onnx.demo.checkpoint import chat_template

    bundle = shutil.copytree(tiny_one.bundle, tmp_path / "thinking")
    tpl = chat_template().replace("{{- '<|im_start|>assistant\\n' -}}", "{{- '<|im_start|>assistant\\n<think>\\n' -}}")
    (bundle / "chat_template.jinja").write_text(tpl)
    ref = Pipeline.from_bundle(bundle).generate([{"role": "user", "content": "Think."}], max_new_tokens=6, temperature=0,
                                                ignore_eos=True)  # fmt: skip
    assert ref.reasoning  # no </think> in 6 random tokens: all of it is reasoning
    s = Server(bundle, "--ctx-size", "256", api_key=None)
    try:
        c = OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Think."}], max_tokens=6,
                                      temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        msg = r.choices[0].message
        assert msg.content == ref.text and msg.reasoning_content == ref.reasoning
        chunks = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Think."}], max_tokens=6,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        streamed = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
        assert streamed == ref.reasoning
    finally:
        s.close()


def test_models_tokenize_detokenize_metrics(server, pipe):
    import httpx

    h = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.url, headers=h, timeout=60) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert c.get("/v1/models/tiny").json() == c.get("/v1/models").json()["data"][0]
        assert c.get("/v1/models/gpt-9").json()["error"]["code"] == "model_not_found"
        ids = pipe.tokenizer.encode("Hello, world!", add_special_tokens=False).ids
        assert c.post("/tokenize", json={"prompt": "Hello, world!"}).json()["tokens"] == ids == [9707, 11, 1879, 0]
        msgs = [{"role": "user", "content": "Hi"}]
        assert c.post("/tokenize", json={"messages": msgs}).json()["tokens"] == pipe.prepare(msgs).ids
        assert c.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello, world!"
        size = pipe.tokenizer.get_vocab_size(with_added_tokens=True)
        r = c.post("/detokenize", json={"tokens": [9707, size]})
        assert r.status_code == 400 and f"token id {size} is not in" in r.json()["error"]["message"], r.text
        r = c.post("/tokenize", json={"content": "Hi"})  # neither a prompt nor messages: the path names no model class
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        metrics = c.get("/metrics").text
        assert "qwen3vl_onnx_generation_tokens_total" in metrics and "qwen3vl_onnx_busy_slots" in metrics
        assert httpx.get(server.url + "/health").status_code == 200  # no key needed


def test_null_fields_mean_their_defaults(server, pipe):
    """OpenAI's API lets a client send null for any optional field (many do); it means the default."""
    import httpx

    messages = [{"role": "user", "content": "Count to five."}]
    nulls = dict.fromkeys(["n", "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
                           "logit_bias", "seed", "stop", "top_p", "max_completion_tokens", "ignore_eos", "top_k", "min_p",
                           "repetition_penalty", "tools", "response_format", "tool_choice", "functions",
                           "function_call"])  # fmt: skip
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60,
                   json={"model": "tiny", "messages": messages, **GREEDY, **nulls})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == _ours(pipe, messages, **GREEDY).text


def test_n_choices_are_each_the_answer_of_their_own_seed(client, pipe, server):
    """n = 2 with a seed: choice i is what one request with seed + i answers, whole and streamed;
    usage counts the prompt once and every choice's tokens."""
    import httpx

    def copied() -> float:  # prompt tokens the server took from a row instead of prefilling them
        text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {server.api_key}"}).text
        return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("qwen3vl_onnx_cached_prompt_tokens_total")))

    messages = [{"role": "user", "content": "Name a colour, any colour you like, with a few words about it."}]
    kw = dict(model="tiny", messages=messages, temperature=1.0, top_p=0.9, max_tokens=6, seed=40, extra_body={"ignore_eos": True})
    before = copied()
    r = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 12
    assert copied() - before >= r.usage.prompt_tokens - 1  # choice 1 started from choice 0's prefilled prompt
    for i, choice in enumerate(r.choices):
        alone = _ours(pipe, messages, ignore_eos=True, temperature=1.0, top_p=0.9, max_tokens=6, seed=40 + i)
        assert choice.message.content == alone.text and r.usage.prompt_tokens == alone.prompt_tokens
    streamed = ["", ""]
    for chunk in client.chat.completions.create(n=2, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == [c.message.content for c in r.choices]


def test_legacy_completions_take_a_raw_prompt(client, pipe, server):
    """/v1/completions continues the prompt's own tokens (no chat template): greedy, its text is
    what the runtime's generate_step gives for those ids; echo, logprobs, token-id prompts, n and
    streaming as OpenAI's legacy route has them."""
    import httpx

    from qwen3vl_onnx.runtime.generate import generate_step
    from qwen3vl_onnx.runtime.sampling import make_sampler

    prompt = "The three shapes in the picture are"
    ids = pipe.tokenizer.encode(prompt, add_special_tokens=False).ids
    ref = [t for t, _ in generate_step(pipe.model, ids, pipe.model.new_cache(), make_sampler(0.0), 6)]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True},
                                  logprobs=2, echo=True)  # fmt: skip
    c = r.choices[0]
    assert c.text == prompt + pipe.tokenizer.decode(ref) and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == 6 and all(len(t) == 2 for t in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == len(prompt) and (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 6)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == pipe.tokenizer.decode(ref)
    streamed = ["", ""]
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=1.0, seed=7, n=2, stream=True,
                                           extra_body={"ignore_eos": True}):  # fmt: skip
        for ch in chunk.choices:
            streamed[ch.index] += ch.text
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=1.0, seed=7, n=2,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert streamed == [ch.text for ch in whole.choices]
    h = {"Authorization": f"Bearer {server.api_key}"}
    for body, says in (({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "best_of": 3}, "best_of"),
                       ({"prompt": ["a", "b"]}, "one prompt per request"), ({"prompt": [10**9]}, "token ids must be below"),
                       ({"prompt": ""}, "prompt")):  # fmt: skip
        e = httpx.post(server.url + "/v1/completions", json=body, headers=h, timeout=60)
        assert e.status_code == 400 and says in e.json()["error"]["message"], e.text
