"""How much memory the server may still take, to refuse at start a KV cache it could not hold."""

from __future__ import annotations

from pathlib import Path


def available_memory() -> int | None:
    """Bytes this process can still take: the kernel's MemAvailable, or less where a cgroup (a
    container's memory limit) allows less; None where neither can be read (not Linux)."""
    free: int | None = None
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free
