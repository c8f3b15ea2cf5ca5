"""Kill ``qwen3vl-onnx batch`` at random moments, start it again each time, and report what each
restart redid. First one uninterrupted run of the same job (its wall time is the reference), then
``--kills`` runs each SIGKILLed at a uniform random moment between 10% and 30% of that time (so
every kill lands inside the job), then one run to the end:

    python scripts/batch_resume.py BUNDLE [--requests 96] [--tokens 48] [--kills 5] [--parallel 4] [--seed 0]

Per restart: the lines OUTPUT held when it was killed and how many the run added; at the end:
whether every request is answered exactly once, and the work redone — the time all interrupted and
final runs took beyond the uninterrupted run's (model loads included: each restart loads again).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def batch(bundle: str, inp: Path, out: Path, parallel: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qwen3vl_onnx.cli", "batch", bundle, str(inp), str(out), "--parallel",
                             str(parallel)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        inp, ref, out = Path(tmp) / "in.jsonl", Path(tmp) / "ref.jsonl", Path(tmp) / "out.jsonl"
        body = {"max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
        requests = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": {**body, "messages": [{"role": "user", "content": f"Tell me about item {i}."}]}}
                    for i in range(args.requests)]  # fmt: skip
        inp.write_text("".join(json.dumps(r) + "\n" for r in requests))
        t = time.perf_counter()
        batch(args.bundle, inp, ref, args.parallel).wait()
        whole = time.perf_counter() - t
        print(f"uninterrupted: {lines(ref)} lines in {whole:.1f} s")
        spent = 0.0
        for k in range(args.kills):
            before, wait = lines(out), rng.uniform(0.1, 0.3) * whole
            t = time.perf_counter()
            p = batch(args.bundle, inp, out, args.parallel)
            try:
                p.wait(timeout=wait)  # a run that ends first is not killed
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
            spent += time.perf_counter() - t
            print(f"kill {k + 1} after {wait:.1f} s: OUTPUT held {before} lines, now {lines(out)}")
        t = time.perf_counter()
        code = batch(args.bundle, inp, out, args.parallel).wait()
        spent += time.perf_counter() - t
        ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
        once = sorted(ids) == sorted(f"r{i}" for i in range(args.requests))
        print(f"final run exit {code}; every request answered exactly once: {once} ({len(ids)} lines)")
        print(
            f"time in all runs {spent:.1f} s against {whole:.1f} s uninterrupted: {spent - whole:.1f} s redone "
            f"over {args.kills} restarts ({(spent - whole) / args.kills:.1f} s each, model load included)"
        )
        return 0 if once and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
