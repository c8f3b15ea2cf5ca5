"""``batch --ray``: the same job on Ray Data, one engine per actor, answers written by this process.

The driver (this process) keeps everything that makes a job resumable: it reads INPUT, skips what
OUTPUT already answers, writes the error lines of rejected input, and appends each answer line as
its block comes back. Actors only answer: each holds the app ``serve`` runs (one engine of
``--parallel`` slots, ONNX Runtime on the actor's CPUs) and posts its block's requests to it in
process, exactly as the local job does, so a line is the same whichever actor answered it.

Requests go out in blocks of ``--parallel`` rows, two blocks in flight per actor: the slots stay fed
across a block's end, and a kill loses at most the blocks in flight. Request bodies travel through
Ray's object store (spilled to disk when large); media named by file:// URLs must be readable at the
same path on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import UserError
from .batch import Answerer, Progress, Request, Summary, Writer, ask, in_process_client, record, started
from .settings import ServerSettings


def actor_class(bundle: Path, settings: ServerSettings, threads: int) -> type:
    """The Ray Data UDF: a class whose instances (one per actor) each start one app. The arguments
    are captured in the class, so Ray ships them with its code rather than as actor arguments."""

    class Engine:
        def __init__(self) -> None:
            from .launch import build_app

            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name="batch-engine", daemon=True).start()
            self.stack = contextlib.AsyncExitStack()
            self.client, self.load_error = None, ""
            try:
                self.client = self._on_loop(self._start(build_app(bundle, settings, threads)))
            except UserError as e:  # told to the driver with the first block: one error line, not an actor's traceback
                self.load_error = str(e)

        def _on_loop(self, coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

        async def _start(self, app: Any) -> Any:
            await self.stack.enter_async_context(started(app))
            return await self.stack.enter_async_context(in_process_client(app))

        def __call__(self, rows: dict[str, Any]) -> dict[str, list[str]]:
            reqs = [Request(int(n), str(c), str(u), json.loads(b)) for n, c, u, b in
                    zip(rows["line"], rows["custom_id"], rows["url"], rows["body"], strict=True)]  # fmt: skip
            if self.load_error:
                return {"answer": [""] * len(reqs), "load_error": [self.load_error] * len(reqs)}

            async def all_of() -> list[dict[str, Any]]:
                return await asyncio.gather(*(ask(self.client, r) for r in reqs))

            lines = self._on_loop(all_of())
            return {"answer": [json.dumps(x, ensure_ascii=False) for x in lines], "load_error": [""] * len(reqs)}

    return Engine


def on_ray(bundle: Path, settings: ServerSettings, threads: int | None, address: str, actors: int | None) -> Answerer:
    """Answer on ``actors`` Ray actors (default: one per node) of the cluster at ``address``."""

    def answer(todo: list[Request], writer: Writer, summary: Summary) -> None:
        from .ray_cluster import connect, engine_cpus, node_cpus

        ray = connect(address, "batch --ray", worker_logs=False)
        try:
            count, cpus = engine_cpus(node_cpus(ray), actors, threads)
            print(f"batch: {len(todo)} requests on {count} Ray actors of {cpus} CPUs, {settings.parallel} slots each",
                  file=sys.stderr)  # fmt: skip
            _run(todo, writer, summary, actor_class(bundle.resolve(), settings, cpus), count, cpus, settings.parallel)
        finally:
            ray.shutdown()

    return answer


def _run(todo: list[Request], writer: Writer, summary: Summary, udf: type, count: int, cpus: int, parallel: int) -> None:
    import ray
    import ray.data

    # Ray Data's INFO lines, notices and its own error reports: the job's summary and one-line errors say it
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job's own bar says done/total
    context.execution_options.preserve_order = False  # an answer is written as soon as its block is back
    context.print_on_execution_start = False
    rows = [{"line": r.line, "custom_id": r.custom_id, "url": r.url, "body": json.dumps(r.body)} for r in todo]
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / parallel))
    ds = ds.map_batches(udf, batch_size=parallel, num_cpus=cpus, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=count, max_concurrent_calls_per_actor=2))  # fmt: skip
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        with Progress(len(todo)) as progress:
            for block in batches:
                if len(block["load_error"]) and block["load_error"][0]:
                    raise UserError(str(block["load_error"][0]))
                for text in block["answer"]:
                    record(json.loads(text), writer, summary)
                progress(len(block["answer"]), summary.tokens)
    except ray.exceptions.RayError as e:
        raise UserError(f"the Ray job failed: {_reason(str(e))}") from None
    finally:
        # Ray Data's executor threads stop when its generator closes; left running past the caller's
        # ray.shutdown(), one of them touches the dead core worker, which ends the process (exit 1)
        # before the one-line error is printed
        batches.close()


def _reason(text: str) -> str:
    """What a failed actor said: this package's own one-line error where the report holds one (a
    bundle that does not load), else the report's first line."""
    mine = f"{UserError.__module__}.{UserError.__name__}: "
    said = [x.split(mine, 1)[1] for x in text.splitlines() if mine in x]
    return (said[-1] if said else next((x for x in text.splitlines() if x.strip()), "no reason given")).strip()[:500]
