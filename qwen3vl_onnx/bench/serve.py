"""Server figures (``bench --serve``), each against a ``qwen3vl-onnx serve`` process started here:

- decode tokens/s of one streaming client, of 4 at once (``--parallel 4``) and of 8 (``--parallel 8``);
- the gaps between tokens of 3 running streams while a 448x448 image prompt is prefilled (p99, max);
- first token of a follow-up question about a 448x448 picture: on the server that answered the first
  question (its slot and vision caches hold it) against a fresh server (everything computed);
- ``--soak SECONDS``: 8 clients for that long, errors counted and the server's RSS sampled;
- in process, no server: a decoder step's time for 1 and 4 rows of one cache at several cached
  lengths, the ceiling of the 4-vs-1 rate and how it falls as conversations grow.

Token times are client-side arrival times of server-sent events (one token per event here).
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .procstats import stats

if TYPE_CHECKING:
    from PIL import Image

STORY = "Tell me a long story about a lighthouse keeper."


class ServerProcess:
    def __init__(self, bundle: Path, *flags: str):
        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, "-m", "qwen3vl_onnx.cli", "serve", str(bundle), "--port", str(port), "--model-name", "m", *flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.log.seek(0)
        raise RuntimeError(f"server did not start: {self.log.read()[-1000:]}")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def png_data_url(img: Image.Image) -> str:
    """A PIL image as a PNG data URL, as a client sends a picture."""
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def picture_url(seed: int, side: int = 448) -> str:
    from PIL import Image

    return png_data_url(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)))


def stream(url: str, messages: list, max_tokens: int, times: list[float] | None = None, temperature: float = 0) -> dict:
    """One streaming request: arrival time of each token, the text, and the time it was sent."""
    import httpx

    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True,
            "stream": True}  # fmt: skip
    times = [] if times is None else times
    text: list[str] = []
    sent = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("role"):
                continue
            times.append(time.perf_counter())
            text.append(delta.get("content") or "")
    return {"sent": sent, "times": times, "text": "".join(text)}


def _concurrent(url: str, clients: int, tokens: int) -> tuple[float, float]:
    """Aggregate decode tokens/s of ``clients`` streams started together (see ``rates``)."""
    out: list[dict] = [{}] * clients
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, stream(url, [{"role": "user", "content": f"{STORY} ({i})"}],
                                                                             tokens))) for i in range(clients)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rates([o["times"] for o in out])


def rates(times: list[list[float]]) -> tuple[float, float]:
    """Tokens/s of streams given each one's token arrival times: over the time all of them stream
    (decode alone), and from the first token to the last (the prompts of the later ones, prefilled
    meanwhile, included). Where no moment has every stream running (one answered whole before
    another's first token: short answers of a tiny model), the first is the second."""
    first, last = min(t[0] for t in times), max(t[-1] for t in times)
    a, b = max(t[0] for t in times), min(t[-1] for t in times)
    overall = sum(len(t) - 1 for t in times) / (last - first)
    together = sum(a < x <= b for t in times for x in t) / (b - a) if b > a else overall
    return together, overall


def decode_scaling(bundle: Path, tokens: int = 64, rounds: int = 3) -> dict:
    """Aggregate decode rates of 1 and 4 clients on one ``--parallel 4`` server, in ``rounds``
    alternating rounds (one round's ratio moved between 1.7x and 2.6x on this project's shared VMs:
    the medians and each round's ratio are reported), then 8 clients on a ``--parallel 8`` one."""
    res: dict = {}
    server = ServerProcess(bundle, "--parallel", "4")
    try:
        _concurrent(server.url, 1, 4)  # warm-up
        runs: dict[int, list[tuple[float, float]]] = {1: [], 4: []}
        for _ in range(rounds):
            for n in (1, 4):
                runs[n].append(_concurrent(server.url, n, tokens))
    finally:
        server.close()
    for n, r in runs.items():
        res[f"decode_{n}_clients_tok_s"] = stats([together for together, _ in r])["median"]
        res[f"decode_{n}_clients_first_to_last_tok_s"] = stats([overall for _, overall in r])["median"]
    res["scaling_4_vs_1_rounds"] = [four[0] / one[0] for one, four in zip(runs[1], runs[4], strict=True)]
    res["scaling_4_vs_1"] = stats(res["scaling_4_vs_1_rounds"])["median"]
    server = ServerProcess(bundle, "--parallel", "8")
    try:
        _concurrent(server.url, 1, 4)
        res["decode_8_clients_tok_s"], res["decode_8_clients_first_to_last_tok_s"] = _concurrent(server.url, 8, tokens)
    finally:
        server.close()
    return res


def decode_worker(bundle: Path, tokens: int) -> None:
    """Our side of ``bench --serve --compare``'s turns (``bench/turns.py``): a ``serve --parallel 4``
    process answering decode rates of 1 and 4 streaming clients, counted as ``_concurrent`` does."""
    from .procstats import serve_loop

    server = ServerProcess(bundle, "--parallel", "4")
    try:
        _concurrent(server.url, 1, 4)  # warm-up
        serve_loop({f"decode_{n}_streams_tok_s": lambda n=n: _concurrent(server.url, n, tokens)[0] for n in (1, 4)})
    finally:
        server.close()


def gaps_during_image_prefill(bundle: Path) -> dict:
    """Three streams run; a 448x448 image question arrives; the streams' token gaps meanwhile."""
    server = ServerProcess(bundle, "--parallel", "4")
    try:
        stream(server.url, [{"role": "user", "content": "warm up"}], 2)
        runs: list[list[float]] = [[], [], []]
        threads = [threading.Thread(target=stream, args=(server.url, [{"role": "user", "content": f"{STORY} {i}"}], 200, runs[i]))
                   for i in range(3)]  # fmt: skip
        for t in threads:
            t.start()
        while min(len(r) for r in runs) < 5:
            time.sleep(0.05)
        content = [{"type": "image_url", "image_url": {"url": picture_url(1)}}, {"type": "text", "text": "What is in it?"}]
        img = stream(server.url, [{"role": "user", "content": content}], 1)
        for t in threads:
            t.join()
        start, end = img["sent"], img["times"][0]
        gaps = [b - a for r in runs for a, b in zip(r, r[1:], strict=False) if b >= start and a <= end]
        return {"image_ttft_s": end - start, "gaps_during_prefill_s": stats(gaps), "p99_gap_s": float(np.percentile(gaps, 99)),
                "max_gap_s": max(gaps), "gaps_counted": len(gaps)}  # fmt: skip
    finally:
        server.close()


def follow_up(bundle: Path) -> dict:
    """First token of a follow-up question about a picture, cached (same server) and recomputed (fresh one)."""
    url = picture_url(2)
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]
    first = [{"role": "user", "content": parts}]
    server = ServerProcess(bundle, "--parallel", "4")
    try:
        answer = stream(server.url, first, 32)["text"]
        history = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And what else is there?"}]
        r = stream(server.url, history, 1)
        cached = r["times"][0] - r["sent"]
    finally:
        server.close()
    server = ServerProcess(bundle, "--parallel", "4")
    try:
        stream(server.url, [{"role": "user", "content": "warm up"}], 2)
        r = stream(server.url, history, 1)
        fresh = r["times"][0] - r["sent"]
    finally:
        server.close()
    return {"follow_up_ttft_cached_s": cached, "follow_up_ttft_fresh_s": fresh, "follow_up_speedup": fresh / cached}


def soak(bundle: Path, seconds: float, clients: int = 8) -> dict:
    """``clients`` clients asking without pause for ``seconds``; RSS after the first minute and at the end."""
    import httpx

    server = ServerProcess(bundle, "--parallel", str(clients), "--ctx-size", "1024")
    errors, done = [], [0] * clients
    stop = time.monotonic() + seconds
    samples: list[tuple[float, float]] = []
    pictures = [picture_url(i, 64) for i in range(4)]

    def client(c: int) -> None:
        rng = random.Random(c)
        while time.monotonic() < stop:
            content: list | str = f"client {c}: {rng.random()}"
            if rng.random() < 0.3:
                content = [{"type": "image_url", "image_url": {"url": rng.choice(pictures)}}, {"type": "text", "text": "Hm?"}]
            try:
                stream(server.url, [{"role": "user", "content": content}], rng.randint(1, 48), temperature=rng.choice([0, 0.8]))
                done[c] += 1
            except (httpx.HTTPError, RuntimeError) as e:
                errors.append(repr(e)[:200])

    try:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples.append((time.monotonic() - t0, server.rss_mb()))
            time.sleep(5)
        base = next((mb for t, mb in samples if t >= min(60, seconds / 4)), samples[0][1])
        return {"soak_s": seconds, "clients": clients, "requests": sum(done), "errors": len(errors), "error_examples": errors[:3],
                "rss_after_warmup_mb": base, "rss_end_mb": samples[-1][1], "rss_growth": samples[-1][1] / base - 1}  # fmt: skip
    finally:
        server.close()


STEP_CACHED = (100, 1000, 2000)


def step_scaling(bundle: Path, cached: tuple[int, ...] = STEP_CACHED, rows: int = 4, pairs: int = 15) -> dict:
    """Decoder steps alone for 1 and ``rows`` rows of one cache, each row holding ``cached`` tokens:
    ``pairs`` pairs of one step each, back to back, so both of a pair meet the same load on a shared
    machine (medians; ``scaling`` is the median of the pairs' ``rows`` x 1-row / ``rows``-row time).
    Why: a server step over several streams is this call, so the scaling bounds the served rate's;
    the matmuls read the weights once for all rows, but attention reads every cached position of
    every row, so the bound falls as conversations grow."""
    from ..runtime.model import BundleModel

    model = BundleModel(bundle)
    cache = model.new_cache(rows, max(cached) + 1)
    cache.prefault()
    views = {r: cache.rows(0, r) for r in (1, rows)}

    def step(r: int, n: int) -> float:
        views[r].lengths[:] = n
        t = time.perf_counter()
        model.step(np.zeros(r, np.int64), views[r])
        return time.perf_counter() - t

    out = []
    for n in cached:
        for _ in range(3):  # first calls at a width and length (allocations, pages) are not timed
            step(1, n), step(rows, n)
        times = [(step(1, n), step(rows, n)) for _ in range(pairs)]
        one, many = (1e3 * float(np.median([t[i] for t in times])) for i in (0, 1))
        scaling = float(np.median([rows * a / b for a, b in times]))
        out.append({"cached": n, "step_1_row_ms": one, "step_rows_ms": many, "scaling": scaling, "pairs": pairs})
    return {"rows": rows, "steps": out}


def run_serve_bench(bundle: Path, soak_s: float | None) -> dict:
    if soak_s:
        return {"soak": soak(bundle, soak_s)}
    print("decode with 1, 4 and 8 clients", file=sys.stderr)
    res = {"decode": decode_scaling(bundle)}
    print("token gaps while an image prompt is prefilled", file=sys.stderr)
    res["image_prefill"] = gaps_during_image_prefill(bundle)
    print("follow-up question, cached and fresh", file=sys.stderr)
    res["follow_up"] = follow_up(bundle)
    print("decoder steps of 1 and 4 rows at several cached lengths (in process)", file=sys.stderr)
    res["step"] = step_scaling(bundle)
    return res


def serve_markdown(result: dict) -> str:
    m = result["machine"]
    flags = " ".join(m["cpu_flags"])
    lines = [f"Server, {result['shape']} {result['precision']} on {m['cpu']} ({m['cores']} cores; {flags})", ""]
    if "soak" in result["serve"]:
        s = result["serve"]["soak"]
        lines.append(f"soak {s['soak_s']:.0f} s, {s['clients']} clients: {s['requests']} requests, {s['errors']} errors, RSS "
                     f"{s['rss_after_warmup_mb']:.0f} -> {s['rss_end_mb']:.0f} MB ({100 * s['rss_growth']:+.1f}%)")  # fmt: skip
        return "\n".join(lines) + "\n"
    d, g, f = result["serve"]["decode"], result["serve"]["image_prefill"], result["serve"]["follow_up"]
    lines += [
        f"decode tok/s while all stream: 1 client {d['decode_1_clients_tok_s']:.1f}, 4 clients {d['decode_4_clients_tok_s']:.1f} "
        f"({d['scaling_4_vs_1']:.2f}x, median of {len(d['scaling_4_vs_1_rounds'])} alternating rounds: "
        f"{' / '.join(f'{r:.2f}' for r in d['scaling_4_vs_1_rounds'])}), "
        f"8 clients (--parallel 8) {d['decode_8_clients_tok_s']:.1f}; first token to last "
        f"(later prompts' prefill included): 4 clients {d['decode_4_clients_first_to_last_tok_s']:.1f}, "
        f"8 clients {d['decode_8_clients_first_to_last_tok_s']:.1f}",
        f"while a 448x448 image prompt was prefilled ({g['image_ttft_s']:.2f} s to its first token): 3 streams' token gaps "
        f"p99 {g['p99_gap_s']:.3f} s, max {g['max_gap_s']:.3f} s, median {g['gaps_during_prefill_s']['median']:.3f} s "
        f"({g['gaps_counted']} gaps)",
        f"follow-up question's first token: {f['follow_up_ttft_cached_s']:.2f} s cached, "
        f"{f['follow_up_ttft_fresh_s']:.2f} s on a fresh server ({f['follow_up_speedup']:.1f}x)",
    ]  # fmt: skip
    if "step" in result["serve"]:
        lines.append(_step_line(result["serve"]["step"]))
    for name, t in result["serve"].get("peers", {}).items():
        lines.append(_peer_line(name, t))
    return "\n".join(lines) + "\n"


def _step_line(step: dict) -> str:
    n = step["rows"]
    parts = [f"{s['cached']} cached: {s['step_1_row_ms']:.0f} / {s['step_rows_ms']:.0f} ms ({s['scaling']:.2f}x)"
             for s in step["steps"]]  # fmt: skip
    head = f"decoder step alone (in process), 1 row / {n} rows, and {n} rows' tokens per second over one row's: "
    return head + "; ".join(parts)


def _peer_line(name: str, t: dict) -> str:
    """One peer's decode rates in turns with ours, each system's 4-vs-1 scaling and the pair ratios."""
    if "skipped" in t:
        return f"{name}: skipped ({t['skipped']})"
    one, four = t["decode_1_streams_tok_s"], t["decode_4_streams_tok_s"]
    med = {who: (one[who]["median"], four[who]["median"]) for who in ("ours", "peer")}
    return (f"in turns with {name} (continuous batching, in process), {one['pair_ratios']['n']} pairs, decode tok/s: "
            f"1 stream ours {med['ours'][0]:.1f} vs {med['peer'][0]:.1f} ({one['pair_ratios']['median']:.2f}x), "
            f"4 streams ours {med['ours'][1]:.1f} vs {med['peer'][1]:.1f} ({four['pair_ratios']['median']:.2f}x); "
            f"4 vs 1 ours {med['ours'][1] / med['ours'][0]:.2f}x, theirs {med['peer'][1] / med['peer'][0]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    decode_worker(Path(sys.argv[1]), int(sys.argv[2]))  # python -m qwen3vl_onnx.bench.serve BUNDLE TOKENS
