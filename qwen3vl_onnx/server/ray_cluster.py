"""Joining a Ray cluster (or starting one on this machine) and sizing engines to its nodes.

Shared by ``batch --ray`` (Ray Data actors) and ``serve --ray-replicas`` (Ray Serve replicas). Only
these commands import Ray, and only when asked: the ``[ray]`` extra brings it.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import UserError

LOCAL = "local"


def require_ray(command: str) -> Any:
    """The ``ray`` module, or a one-line error saying which extra brings it."""
    try:
        import ray
        import ray.data  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise UserError(f"{command} needs the ray extra: pip install -e '.[ray]' in the project's clone "
                        f"({e.name} is missing)") from None  # fmt: skip
    return ray


def connect(address: str, command: str, worker_logs: bool = True) -> Any:
    """Ray initialised on ``address`` (a running cluster, e.g. ``ray://head:10001`` or ``auto``), or,
    for ``local``, on a cluster started here with this process's CPUs. Workers must import this
    package: on a cluster, install it on every node. ``worker_logs``: the actors' output printed here
    (a server's log wants it; a batch job reports through its lines and summary instead)."""
    ray = require_ray(command)
    # The engines log through the server's logger; Ray's own INFO lines (and its dashboard) stay off.
    common: dict[str, Any] = {"logging_level": logging.ERROR, "configure_logging": True, "log_to_driver": worker_logs}
    try:
        if address == LOCAL:
            from ..cli_args import usable_cores

            ray.init(address="local", num_cpus=usable_cores(), include_dashboard=False, **common)
        else:
            ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--ray {address}: cannot join the Ray cluster ({first})") from None
    return ray


def node_cpus(ray: Any) -> list[int]:
    """The CPU count of every live node of the cluster Ray is connected to."""
    return [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]


def engine_cpus(nodes: list[int], engines: int | None, threads: int | None) -> tuple[int, int]:
    """(engines, CPUs each): by default one engine per node, sized to the smallest node's cores;
    with a count, the cluster's cores shared out (at most a node's worth each, so every engine fits
    on one node); ``threads`` fixes the CPUs each. ONNX Runtime runs that many threads per engine."""
    if not nodes:
        raise UserError("the Ray cluster has no node with a CPU")
    count = engines or len(nodes)
    cpus = threads or max(1, min(min(nodes), sum(nodes) // count))
    if cpus > max(nodes):
        raise UserError(f"--threads {cpus}: no node of the Ray cluster has that many CPUs (largest: {max(nodes)})")
    return count, cpus
