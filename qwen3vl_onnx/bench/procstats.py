"""Standard-library helpers every bench process shares: median statistics, a process's own peak
memory, and the line that says why a child failed. Stdlib only because ``peer_openvino.py`` runs
under OpenVINO's own virtual environment, where this package is not installed, and imports this
file from beside it.

Peak memory is VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` across fork and exec, so a
child started by a parent that once held 9 GB (say, after writing a random 8B checkpoint) reports
9 GB whatever it used itself, while VmHWM belongs to the memory map that exec creates afresh.
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def stats(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def hwm_gb(pid: int | str = "self") -> float | None:
    """VmHWM (peak resident memory of the process's current image) from /proc, None where absent."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def peak_rss_gb() -> float:
    """This process's own peak RSS (``ru_maxrss`` only where there is no /proc)."""
    own = hwm_gb()
    return own if own is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_polled(cmd: list[str], poll_s: float = 0.05) -> tuple[int, str, str, float]:
    """Run ``cmd``: (exit code, stdout, stderr, its own peak RSS in GB), the peak read from its VmHWM
    while it runs (growth in its last ``poll_s`` would be missed). Without /proc, or for a child
    done within one poll, the peak is the largest child so far (``RUSAGE_CHILDREN``), an upper bound."""
    peak = 0.0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        while True:
            try:
                out, err = proc.communicate(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                peak = max(peak, hwm_gb(proc.pid) or 0.0)
    if not peak:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return proc.returncode, out, err, peak


_REASON = re.compile(r"ASSERT|Error|error:|Exception|Killed|Aborted|Segmentation fault|out of memory")


def failure_reason(stderr: str) -> str:
    """The line of a failed child's output that says why: the last one naming an error or assertion,
    not whatever came last (a native abort ends with gdb's backtrace noise, not its message)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()] or ["no output"]
    return next((ln for ln in reversed(lines) if _REASON.search(ln)), lines[-1])[-300:]


def serve_loop(answer: dict[str, Callable[[], float]]) -> None:
    """Worker side of ``bench/turns.py``'s protocol: ``ready``, then one JSON answer per task line."""
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps({"value": answer[line.strip()]()}), flush=True)
