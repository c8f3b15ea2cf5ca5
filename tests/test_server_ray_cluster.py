"""A Ray cluster of two nodes with one CPU each (two raylets on this machine), joined by address:
``serve --ray-replicas 2`` puts one replica on each node and answers the openai client (streaming,
the API key and the media rules included); ``batch --ray ADDRESS`` starts one actor per node, and a
bundle the actors cannot load ends the job in one line. Engine sizing rules as unit tests."""

from __future__ import annotations

import shutil
import signal
import threading
import time
import urllib.request

import pytest

from qwen3vl_onnx import Pipeline

from .conftest import Server, picture
from .test_server_batch import _batch, _line, _write
from .test_server_engine import _same_or_near_tie


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def test_serve_on_two_ray_replicas_with_the_openai_client(cluster, tiny_one, tmp_path):
    """Each replica reserves one CPU, so the two run on different nodes."""
    import openai

    media = tmp_path / "media"
    media.mkdir()
    img = picture(48, 64, seed=4)
    img.save(media / "p.png")
    picture(32, 32).save(tmp_path / "outside.png")
    server = Server(tiny_one.bundle, "--ray", cluster.address, "--ray-replicas", "2", "--parallel", "2",
                    "--allowed-media-dir", str(media), timeout=240)  # fmt: skip
    try:
        _until_every_replica_is_ready(server.url)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
        pipe = Pipeline.from_bundle(tiny_one.bundle)
        prompts = [f"Item {i}: " + "tell me more " * i for i in range(4)]
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


def test_an_actor_that_cannot_load_the_bundle_stops_the_job_in_one_line(cluster, tiny_one, tmp_path):
    """The driver reads the manifest only; the actors (one per node by default) load the graphs. A
    graph that does not parse ends the job with the load error in one line, no actor traceback, and
    no answer line written (so a rerun with a good bundle asks everything)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_one.bundle, bundle)
    graph = bundle / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    _write(tmp_path / "in.jsonl", [_line("a", "hi"), _line("b", "there")])
    r = _batch(bundle, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--ray", cluster.address, timeout=240)
    assert r.returncode == 2, r.stderr
    assert "2 requests on 2 Ray actors of 1 CPUs" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: the model failed to load: ") and "decoder.onnx" in r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    assert (tmp_path / "out.jsonl").read_text() == ""


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
