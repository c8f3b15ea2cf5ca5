"""``batch --ray local``: the job on two Ray Data actors of a cluster the command starts itself.
Answers are compared with Pipeline.generate up to the batched near-tie the server tests allow for
(``test_server_engine._same_or_near_tie``); the local run is held to the same in
``test_server_batch``, so the two runs answer alike. The resume rule is the driver's, as locally."""

from __future__ import annotations

import json
import subprocess
import sys

from qwen3vl_onnx import Pipeline

from .conftest import one_line_error, picture
from .test_server_api import data_url
from .test_server_batch import _batch, _line, _read, _write
from .test_server_engine import _same_or_near_tie


def test_batch_on_two_ray_actors_resumes_and_answers_as_generate(tiny_one, tmp_path):
    img = picture(56, 40, seed=3)
    good = [_line(f"q{i}", f"Question {i}: " + "more " * i, n=5 + i) for i in range(6)]
    good.append(_line("pic", [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": "What?"}]))
    badimg = _line("badimg", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])  # a 400 from an actor
    _write(tmp_path / "in.jsonl", good[:3] + ["{not json", json.dumps({**good[0], "custom_id": "q0"}), badimg] + good[3:])

    # what a killed run left: line 4's error, line 5's (q0 repeated), q0's answer, and a torn line
    def error(cid: str | None, code: str, line: int) -> dict:
        return {
            "id": f"batch_req_{line}",
            "custom_id": cid,
            "response": None,
            "error": {"code": code, "message": "-", "line": line},
        }

    answer = {
        "id": "batch_req_q0",
        "custom_id": "q0",
        "response": {"status_code": 200, "request_id": "r", "body": {}},
        "error": None,
    }
    kept = [error(None, "invalid_json", 4), error("q0", "duplicate_custom_id", 5), answer]
    (tmp_path / "out.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept) + '{"id": "batch_req_torn", "cus')
    r = _batch(tiny_one.bundle, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--parallel", "2", "--ray", "local",
               "--ray-actors", "2", timeout=300)  # fmt: skip
    assert r.returncode == 1, r.stderr  # badimg failed
    assert "7 requests on 2 Ray actors of 1 CPUs, 2 slots each" in r.stderr, r.stderr
    assert "6 done, 1 failed, 3 skipped" in r.stderr.strip().splitlines()[-1], r.stderr
    out = _read(tmp_path / "out.jsonl")
    assert sorted(out) == sorted(["line4", "line5", "badimg", *(x["custom_id"] for x in good)])
    assert out["q0"]["id"] == "batch_req_q0"  # kept, not asked again
    assert (
        out["badimg"]["error"]["code"] and out["badimg"]["error"]["line"] == 6 and out["badimg"]["response"]["status_code"] == 400
    )
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    for line in good[1:]:
        content = line["body"]["messages"][0]["content"]
        asked = content if isinstance(content, str) else [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]
        ref = pipe.generate([{"role": "user", "content": asked}], max_new_tokens=line["body"]["max_tokens"],
                            temperature=0, ignore_eos=True, logprobs=2)  # fmt: skip
        got = out[line["custom_id"]]
        assert got["error"] is None and got["response"]["body"]["usage"]["completion_tokens"] == line["body"]["max_tokens"]
        _same_or_near_tie(got["response"]["body"], ref, pipe.tokenizer)


def test_without_the_ray_extra_the_command_says_so_in_one_line(setup, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps(_line("a", "hi")) + "\n")
    code = ("import sys; sys.modules['ray'] = None\n"  # what an install without the ray extra sees
            "from qwen3vl_onnx.cli import main\n"
            f"sys.exit(main(['batch', {str(setup / 'bundle')!r}, 'in.jsonl', 'out.jsonl', '--ray', 'local']))\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    one_line_error(r, "batch --ray needs the ray extra", "pip install")
