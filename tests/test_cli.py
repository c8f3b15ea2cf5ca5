"""The command line end to end, as a user runs it, including every bad-input path."""

from __future__ import annotations

import json
import shutil

import pytest

from qwen3vl_onnx import Pipeline

from .conftest import CONTEXT, one_line_error, picture


def test_generate_json_schema(cli, setup):
    r = cli("generate", setup / "bundle", "--prompt", "What is this?", "--image", setup / "img.png",
            "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(obj) >= {"text", "token_ids", "prompt_tokens", "completion_tokens", "timings"}
    assert obj["completion_tokens"] == len(obj["token_ids"]) == 6
    assert obj["prompt_tokens"] > 64  # the image alone is 64 tokens at the minimum pixel budget
    assert {"ttft_s", "vision_s", "prefill_s", "decode_s"} <= set(obj["timings"])


def test_streaming_equals_non_streaming(cli, setup):
    args = ["generate", setup / "bundle", "--prompt", "Tell me", "--image", setup / "img.png", "--max-new-tokens", "12",
            "--temperature", "0.8", "--seed", "7", "--ignore-eos"]  # fmt: skip
    plain = cli(*args)
    js = cli(*args, "--json")
    assert plain.returncode == 0 and js.returncode == 0, plain.stderr + js.stderr
    assert plain.stdout[:-1] == json.loads(js.stdout.strip().splitlines()[-1])["text"]

    from qwen3vl_onnx import Pipeline

    pipe = Pipeline.from_bundle(setup / "bundle")
    msgs = [
        {"role": "user", "content": [{"type": "image", "image": str(setup / "img.png")}, {"type": "text", "text": "Tell me"}]}
    ]
    kw = dict(max_new_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    stream = pipe.generate(msgs, stream=True, **kw)
    pieces = list(stream)
    whole = pipe.generate(msgs, **kw)
    assert "".join(pieces) == whole.text == stream.result.text
    assert stream.result.token_ids == whole.token_ids


def test_multibyte_stream_pieces_are_whole_characters(setup):
    """Decoding emoji byte by byte must never hand out a broken character."""
    from qwen3vl_onnx import Pipeline
    from qwen3vl_onnx.runtime.text_stream import Detokenizer

    tk = Pipeline.from_bundle(setup / "bundle").tokenizer
    text = "héllo 😀🎉 中文 ok"
    ids = tk.encode(text).ids
    assert len(ids) > len(text.split())  # emoji split over several byte tokens
    d = Detokenizer(tk)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_missing_checkpoint_dir(run_cli, tmp_path):
    one_line_error(run_cli("export", tmp_path / "nope", tmp_path / "out"), "not found")
    assert not (tmp_path / "out").exists()


def test_not_qwen3vl(run_cli, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    one_line_error(run_cli("export", tmp_path / "ck", tmp_path / "out"), "LlamaForCausalLM")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, says",
    [(["--precision", "int4", "--int8-projections", "v_proj,qkv"], "unknown projection(s) qkv"),
     (["--precision", "fp32", "--int8-projections", "lm_head"], "int4 bundles only"),
     (["--precision", "fp16", "--prefill-int8"], "--prefill-int8 applies to int4/int8 bundles, not fp16")],
)  # fmt: skip
def test_bad_quantization_options(run_cli, tmp_path, args, says):
    one_line_error(run_cli("export", tmp_path / "nope", tmp_path / "out", *args), says)


@pytest.mark.parametrize("flag, recorded", [("none", []), ("lm_head,o_proj", ["o_proj", "lm_head"])])
def test_int4_export_and_generate_with_chosen_8bit_projections(run_cli, setup, tmp_path, flag, recorded):
    r = run_cli("export", setup / "ckpt", tmp_path / "b", "--precision", "int4", "--int8-projections", flag)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["decoder_options"]["int8_projections"] == recorded
    args = ("--prompt", "Hi", "--max-new-tokens", "4", "--ignore-eos", "--json")
    r = run_cli("generate", tmp_path / "b", "--image", setup / "img.png", *args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["completion_tokens"] == 4


def test_prefill_int8_export_and_generate(run_cli, setup, tmp_path):
    """--prefill-int8 adds decoder_prefill.onnx (recorded in the manifest); generate runs the prompt
    through it and decodes with the compact graph."""
    r = run_cli("export", setup / "ckpt", tmp_path / "b", "--precision", "int4", "--prefill-int8")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["prefill_int8"] is True and manifest["graphs"]["decoder_prefill"]["file"] == "decoder_prefill.onnx"
    assert manifest["graphs"]["decoder_prefill"]["inputs"] == manifest["graphs"]["decoder"]["inputs"]
    args = ("--prompt", "Hi", "--max-new-tokens", "4", "--ignore-eos", "--json")
    for extra in ((), ("--no-prefill-graph",)):
        r = run_cli("generate", tmp_path / "b", "--image", setup / "img.png", *args, *extra)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["completion_tokens"] == 4
    assert Pipeline.from_bundle(tmp_path / "b").model.prefill_decoder is not None
    assert Pipeline.from_bundle(tmp_path / "b", prefill_graph=False).model.prefill_decoder is None


@pytest.mark.parametrize("damage", ["missing", "truncated", "missing_shard"])
def test_bad_safetensors(run_cli, setup, tmp_path, damage):
    ck = tmp_path / "ck"
    shutil.copytree(setup / "ckpt", ck)
    st = ck / "model.safetensors"
    if damage == "missing":
        st.unlink()
        needle = "no .safetensors"
    elif damage == "truncated":
        with open(st, "r+b") as f:
            f.truncate(st.stat().st_size // 2)
        needle = "truncated"
    else:
        (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
        needle = "missing"
    one_line_error(run_cli("export", ck, tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_images(run_cli, setup, tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    one_line_error(
        run_cli("generate", setup / "bundle", "--prompt", "x", "--image", tmp_path / "corrupt.jpg"), "corrupt.jpg", "cannot read"
    )
    one_line_error(
        run_cli("generate", setup / "bundle", "--prompt", "x", "--image", tmp_path / "absent.png"), "absent.png", "not found"
    )


def test_prompt_longer_than_context(run_cli, setup):
    r = run_cli("generate", setup / "bundle", "--prompt", "word " * (CONTEXT + 10))
    one_line_error(r, "context", str(CONTEXT))


def test_bundle_missing_graph(run_cli, setup, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(setup / "bundle", b)
    (b / "vision.onnx").unlink()
    one_line_error(run_cli("generate", b, "--prompt", "x"), "vision.onnx")
    one_line_error(run_cli("generate", tmp_path / "nobundle", "--prompt", "x"), "manifest.json")


@pytest.mark.parametrize("content, says", [
    ("{not json", "not a readable manifest"),
    ("[]", "not a bundle manifest (a JSON list, not an object)"),
    ('"text"', "a JSON str, not an object"),
    (b"\xff\xfe\x00garbage", "not a readable manifest"),
    ('{"format_version": 2}', "the manifest is damaged (KeyError"),
    ('{"format_version": 2, "config": [], "graphs": {}}', "the manifest is damaged"),
    ('{"format_version": "2"}', "bundle is format '2', this version reads format"),
])  # fmt: skip
def test_damaged_manifest_is_one_line(run_cli, setup, tmp_path, content, says):
    """A manifest cut short, overwritten or edited by hand: one line naming it, never a traceback."""
    from qwen3vl_onnx.config import BUNDLE_FORMAT_VERSION

    b = shutil.copytree(setup / "bundle", tmp_path / "b")
    if isinstance(content, str):
        content = content.replace('"format_version": 2', f'"format_version": {BUNDLE_FORMAT_VERSION}').encode()
    (b / "manifest.json").write_bytes(content)
    for args in (["generate", b, "--prompt", "x"], ["eval", b], ["bench", "--bundle", b, "--out", tmp_path / "o"]):
        one_line_error(run_cli(*args), says)


def test_verify_passes_and_catches_a_wrong_bundle(run_cli, tiny_one, setup, tmp_path):
    picture(50, 70).save(tmp_path / "v.png")
    ok = run_cli("verify", tiny_one.checkpoint, tiny_one.bundle, "--image", tmp_path / "v.png", "--steps", "4")
    assert ok.returncode == 0 and "PASS" in ok.stdout, ok.stdout + ok.stderr
    # Same geometry, other weights (the numpy-built checkpoint): verify must fail, not shrug.
    bad = run_cli("verify", tiny_one.checkpoint, setup / "bundle", "--image", tmp_path / "v.png", "--steps", "4")
    assert bad.returncode == 1 and "FAIL" in bad.stdout, bad.stdout + bad.stderr


def test_demo_end_to_end(cli, tmp_path):
    r = cli("demo", "--workdir", tmp_path / "demo", "--seed", "11", "--questions", "5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    score = next(line for line in lines if " correct (seed 11;" in line)
    assert sum("expected:" in line for line in lines) == 5 and score.split("/")[0].isdigit()
    assert int(score.split("/")[0]) >= 4  # the trained model gets fresh pictures right
    assert lines[-1].startswith(f"bundle:     {tmp_path / 'demo' / 'shapes' / 'bundle'}")  # where to find it again
    assert (tmp_path / "demo" / "shapes" / "bundle" / "manifest.json").is_file()
    pictures = tmp_path / "demo" / "pictures"
    assert len(list(pictures.glob("*.png"))) >= 5 and f"this run's pictures in {pictures}" in score
    (tmp_path / "demo" / "picture-0-0.png").write_bytes(b"left by an earlier version")
    r = cli("demo", "--workdir", tmp_path / "demo", "--seed", "12", "--questions", "1")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in pictures.iterdir()] == ["picture-0-0.png"]  # only the last run's pictures are kept
    assert not list((tmp_path / "demo").glob("*.png"))


def test_demo_random_weights_and_a_stale_cache(run_cli, tmp_path):
    """The random-weight demo answers (meaninglessly) and says where its bundle is; a cached bundle
    from another checkpoint or exporter (here: an old format and no stamp) is then made again
    instead of being refused or silently reused."""
    work = tmp_path / "demo"
    r = run_cli("demo", "--random", "--workdir", work, "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "assistant" in r.stdout and "random weights" in r.stdout
    assert f"bundle:     {work / 'random' / 'bundle'}" in r.stdout
    manifest = work / "random" / "bundle" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["format_version"] = 1
    manifest.write_text(json.dumps(m))
    (work / "random" / "stamp").unlink()
    r = run_cli("demo", "--random", "--workdir", work, "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "exported" in r.stderr and json.loads(manifest.read_text())["format_version"] != 1


def test_runtime_needs_no_torch(setup):
    """Inference imports neither torch nor transformers (they are test/verify extras only)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from qwen3vl_onnx.runtime.pipeline import Pipeline\n"
        f"p = Pipeline.from_bundle({str(setup / 'bundle')!r})\n"
        f"img = {{'type': 'image', 'image': {str(setup / 'img.png')!r}}}\n"
        "m = [{'role': 'user', 'content': [img, {'type': 'text', 'text': 'hi'}]}]\n"
        "p.generate(m, max_new_tokens=2, temperature=0)\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'ray')]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_generate_and_chat_with_tools_and_a_json_schema(run_cli, tiny_one, tmp_path):
    """generate --tools prints each call as one JSON line (OpenAI's shape), --json-schema answers
    valid JSON; chat shows calls and takes their results with /result."""
    import subprocess
    import sys

    import jsonschema

    from .test_constrain import ITEM, SCHEMAS, TOOLS

    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    (tmp_path / "item.json").write_text(json.dumps(ITEM))
    r = run_cli("generate", tiny_one.bundle, "--prompt", "Weather?", "--tools", tmp_path / "tools.json", "--tool-choice", "add",
                "--temperature", "1", "--seed", "3", "--max-new-tokens", "80")  # fmt: skip
    assert r.returncode == 0, r.stderr
    call = json.loads(r.stdout.strip().splitlines()[-1])
    assert call["type"] == "function" and call["function"]["name"] == "add"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["add"])
    r = run_cli("generate", tiny_one.bundle, "--prompt", "Item?", "--json-schema", tmp_path / "item.json", "--temperature", "1",
                "--seed", "3", "--max-new-tokens", "120", "--json")  # fmt: skip
    jsonschema.validate(json.loads(json.loads(r.stdout)["text"]), ITEM)
    missing = run_cli("generate", tiny_one.bundle, "--prompt", "x", "--json-schema", tmp_path / "no.json")
    one_line_error(missing, "no.json: cannot read the JSON schema")
    cmd = [sys.executable, "-m", "qwen3vl_onnx.cli", "chat", str(tiny_one.bundle), "--tools", str(tmp_path / "tools.json"),
           "--tool-choice", "add", "--temperature", "1", "--seed", "1", "--max-new-tokens", "60"]  # fmt: skip
    chat = subprocess.run(cmd, input="Add them.\n/result 3\n/result 4\n", capture_output=True, text=True, timeout=300)
    assert "[tool call add(" in chat.stdout and "error: no tool call is waiting for a result" not in chat.stderr
    assert chat.stdout.count("[tool call add(") == 3, chat.stdout  # one call an answer; each result brings the next answer
