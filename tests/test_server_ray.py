"""Ray: ``batch --ray local`` (Ray Data, two actors) answers as the local run does and keeps the
resume rule; ``serve --ray-replicas 2`` (Ray Serve) answers the openai client, streaming, the API
key and the media rules included. Each test starts its own local Ray cluster (a few seconds) and
stops it. Answers are compared with Pipeline.generate up to the batched near-tie the server tests
allow for (``test_server_engine._same_or_near_tie``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from qwen3vl_onnx import Pipeline

from .conftest import Server, one_line_error, picture
from .test_server_api import data_url
from .test_server_batch import _batch, _line, _read, _write
from .test_server_engine import _same_or_near_tie

pytest.importorskip("ray", reason="the ray extra is part of the test extra; install it with pip install -e '.[test]'")


def test_batch_on_two_ray_actors_answers_as_the_local_run(tiny_one, tmp_path):
    img = picture(56, 40, seed=3)
    good = [_line(f"q{i}", f"Question {i}: " + "more " * i, n=5 + i) for i in range(6)]
    good.append(_line("pic", [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": "What?"}]))
    badimg = _line("badimg", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])  # a 400 from an actor
    _write(tmp_path / "in.jsonl", good[:3] + ["{not json", json.dumps({**good[0], "custom_id": "q0"}), badimg] + good[3:])
    local = _batch(tiny_one.bundle, tmp_path / "in.jsonl", tmp_path / "local.jsonl", "--parallel", "2")
    assert local.returncode == 1 and "7 done, 3 failed, 0 skipped" in local.stderr, local.stderr
    # the Ray run resumes what a killed run left: the rejected lines' errors (written first), q0's answer, a torn line
    written = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert [w["error"]["code"] for w in written[:2]] == ["invalid_json", "duplicate_custom_id"]
    kept = [json.dumps(w) for w in written[:2] + [w for w in written if w["custom_id"] == "q0" and not w["error"]]]
    (tmp_path / "ray.jsonl").write_text("".join(x + "\n" for x in kept) + '{"id": "batch_req_torn", "cus')
    r = _batch(tiny_one.bundle, tmp_path / "in.jsonl", tmp_path / "ray.jsonl", "--parallel", "2", "--ray", "local",
               "--ray-actors", "2", timeout=300)  # fmt: skip
    assert r.returncode == 1, r.stderr  # badimg failed
    assert "7 requests on 2 Ray actors of 1 CPUs, 2 slots each" in r.stderr, r.stderr
    assert "6 done, 1 failed, 3 skipped" in r.stderr.strip().splitlines()[-1], r.stderr
    a, b = _read(tmp_path / "local.jsonl"), _read(tmp_path / "ray.jsonl")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key]["error"] or {}).get("code") == (b[key]["error"] or {}).get("code"), key
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    for line in good:
        content = line["body"]["messages"][0]["content"]
        local_content = (
            content if isinstance(content, str) else [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]
        )
        ref = pipe.generate([{"role": "user", "content": local_content}], max_new_tokens=line["body"]["max_tokens"],
                            temperature=0, ignore_eos=True, logprobs=2)  # fmt: skip
        for out in (a, b):
            _same_or_near_tie(out[line["custom_id"]]["response"]["body"], ref, pipe.tokenizer)


def test_serve_on_two_ray_replicas_with_the_openai_client(tiny_one, tmp_path):
    """A Ray cluster of two nodes of one CPU each (two raylets on this machine), joined by address:
    each replica reserves one CPU, so the two run on different nodes."""
    import openai
    from ray.cluster_utils import Cluster

    media = tmp_path / "media"
    media.mkdir()
    img = picture(48, 64, seed=4)
    img.save(media / "p.png")
    picture(32, 32).save(tmp_path / "outside.png")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        server = Server(tiny_one.bundle, "--ray", cluster.address, "--ray-replicas", "2", "--parallel", "2",
                        "--allowed-media-dir", str(media), timeout=240)  # fmt: skip
    except BaseException:
        cluster.shutdown()
        raise
    try:
        _until_every_replica_is_ready(server.url)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
        pipe = Pipeline.from_bundle(tiny_one.bundle)
        prompts = [f"Item {i}: " + "tell me more " * i for i in range(5)]
        answers: dict[int, object] = {}

        def ask(i: int) -> None:
            answers[i] = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                                        max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
                                                        extra_body={"ignore_eos": True})  # fmt: skip

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, p in enumerate(prompts):
            ref = pipe.generate([{"role": "user", "content": p}], max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
            _same_or_near_tie(answers[i].model_dump(), ref, pipe.tokenizer)

        # streaming through Ray Serve's proxy: the pieces arrive as chunks and add up to the answer
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": (media / "p.png").as_uri()}},
                                                 {"type": "text", "text": "What is it?"}]}]  # fmt: skip
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 2 and chunks[-1].choices[0].finish_reason == "length"
        local = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
        ref = pipe.generate(local, max_new_tokens=6, temperature=0, ignore_eos=True)
        assert "".join(pieces) == ref.text

        # the app's rules hold behind the proxy: media outside the allowed folder, a wrong key
        outside = [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": (tmp_path / "outside.png").as_uri()}}]}
        ]
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="tiny", messages=outside, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0, server.output()[-2000:]
    finally:
        server.close()
        cluster.shutdown()


def _until_every_replica_is_ready(url: str, timeout: float = 120) -> None:
    """Each replica answers /health 503 until its bundle is loaded and Ray Serve spreads requests
    over both: twelve 200s in a row mean both are ready (a loading one would be picked ~half the time)."""
    deadline, ok = time.monotonic() + timeout, 0
    while ok < 12:
        assert time.monotonic() < deadline, "the replicas did not all become ready"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                ok = ok + 1 if r.status == 200 else 0
        except OSError:
            ok = 0
            time.sleep(0.3)


def test_without_the_ray_extra_the_command_says_so_in_one_line(setup, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps(_line("a", "hi")) + "\n")
    code = ("import sys; sys.modules['ray'] = None\n"  # what an install without the ray extra sees
            "from qwen3vl_onnx.cli import main\n"
            f"sys.exit(main(['batch', {str(setup / 'bundle')!r}, 'in.jsonl', 'out.jsonl', '--ray', 'local']))\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    one_line_error(r, "batch --ray needs the ray extra", "pip install")


@pytest.mark.parametrize(
    "nodes,engines,threads,want",
    [
        ([2], 2, None, (2, 1)),
        ([16, 16], None, None, (2, 16)),
        ([8, 16], None, None, (2, 8)),
        ([16, 16], 8, None, (8, 4)),
        ([4], 1, 2, (1, 2)),
        ([4, 4], 3, None, (3, 2)),
    ],  # fmt: skip
)
def test_engines_are_sized_to_the_nodes(nodes, engines, threads, want):
    from qwen3vl_onnx.server.ray_cluster import engine_cpus

    assert engine_cpus(nodes, engines, threads) == want


def test_an_engine_larger_than_any_node_is_refused():
    from qwen3vl_onnx.errors import UserError
    from qwen3vl_onnx.server.ray_cluster import engine_cpus

    with pytest.raises(UserError, match="no node of the Ray cluster has that many CPUs"):
        engine_cpus([4, 4], 1, 8)


def test_an_actor_that_cannot_load_the_bundle_stops_the_job_in_one_line(tiny_one, tmp_path):
    """The driver reads the manifest only; the actors load the graphs. A graph that does not parse
    ends the job with the load error in one line, no actor traceback, and no answer line written
    (so a rerun with a good bundle asks everything)."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_one.bundle, bundle)
    graph = bundle / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    _write(tmp_path / "in.jsonl", [_line("a", "hi"), _line("b", "there")])
    r = _batch(bundle, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--ray", "local", timeout=240)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: the model failed to load: ") and "decoder.onnx" in r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    assert (tmp_path / "out.jsonl").read_text() == ""
