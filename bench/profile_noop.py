"""Where a no-op hypha task spends the worker's CPU: Celery's own tracer, in process, on a real Redis.

``python -m bench.profile_noop`` runs ``hypha.noop`` through the tracer a worker's pool runs
(``celery.app.trace.build_tracer``), with the worker's result backend class and node context, against an
embedded Redis: ``STARTED`` with the reservation, the result with the release and Celery's ``saferepr``
of it all happen; only the broker and the worker's event loop are left out. It prints the CPU per task
of this process and of the Redis server for hypha's no-op, for ``celery.accumulate`` through the same
backend (what any task costs there) and for a bare task of a plain Celery app (Celery's own backend),
the median of 5 interleaved runs; then pyinstrument's call tree of hypha's path. One thread and no
broker: much steadier than step 1 of ``make bench``, and it shows which part a change moved.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

N = int(os.environ.get("HYPHA_PROFILE_CALLS", "2000"))
REQUIREMENTS = {"requirements": {"cpu_cores": 0.01, "memory": "1MB"}}


def _request(task_id: str, name: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The request a worker hands the tracer for a message from the shared queue."""
    return {"id": task_id, "task": name, "hostname": "profile@host", "args": args, "kwargs": kwargs,
            "delivery_info": {"exchange": "", "routing_key": "hypha", "priority": 0, "redelivered": False},
            "headers": {}, "reply_to": None, "correlation_id": task_id}


def _run_once(trace: Any, label: str, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """One task through ``trace``, as a worker's pool runs it; a failure stops the profile."""
    task_id = str(uuid.uuid4())
    outcome = trace(task_id, args, kwargs, _request(task_id, name, args, kwargs))
    if outcome.info is not None:  # a failure: its exception is the return value
        raise SystemExit(f"{label} failed: {outcome.retval!r}")


def main() -> int:
    import psutil
    from celery import Celery
    from celery.app.trace import build_tracer
    from pyinstrument import Profiler

    from hypha_celery.config import parse_config
    from hypha_celery.harness.embedded_redis import EmbeddedRedis
    from hypha_celery.resources.capabilities import node_capacity
    from hypha_celery.worker.backend import ResultBackend, backend_aliases
    from hypha_celery.worker.bootsteps import bind_tasks
    from hypha_celery.worker.context import NodeContext

    with EmbeddedRedis() as server:
        os.environ["HYPHA_REGISTRY_URL"] = server.url
        cfg = parse_config({"worker": {
            "models": {"model_dir": tempfile.mkdtemp(prefix="hypha-profile-")},
            "security": {"verify_task_signatures": False},
            "monitoring": {"collect_metrics": False},
            "resources": {"node_id": "profile", "memory": "8GB"},
        }})
        ctx = NodeContext.build(cfg)
        ctx.ledger.set_capacity(node_capacity(cfg))
        from hypha_celery.celery import app

        app.conf.update(result_backend=server.url, broker_url=server.url)
        app.loader.import_default_modules()  # hypha's tasks, as the worker imports them
        app.loader.override_backends = backend_aliases(app.loader.override_backends)  # as the worker does
        assert isinstance(app.backend, ResultBackend)
        bind_tasks(app, ctx)
        plain = Celery("plain", set_as_current=False)
        plain.config_from_object("hypha_celery.config.settings")
        plain.conf.update(result_backend=server.url, broker_url=server.url)

        @plain.task(name="plain.noop")
        def bare(**_: object) -> dict[str, Any]:
            return {"output": None}

        runs: dict[str, Callable[[], None]] = {}
        for label, owner, name, args, kwargs in (
            ("hypha.noop", app, "hypha.noop", [], REQUIREMENTS),
            ("celery.accumulate, hypha's backend", app, "celery.accumulate", [1], {}),
            ("a bare task, Celery's backend", plain, "plain.noop", [], {}),
        ):
            trace = build_tracer(name, owner.tasks[name], app=owner, eager=False)
            runs[label] = functools.partial(_run_once, trace, label, name, args, kwargs)
        redis_server = psutil.Process(server.process.pid)

        def measure(one: Callable[[], None]) -> tuple[float, float]:
            cpu, served = time.process_time(), sum(redis_server.cpu_times()[:2])
            for _ in range(N):
                one()
            return (time.process_time() - cpu) / N * 1e6, (sum(redis_server.cpu_times()[:2]) - served) / N * 1e6

        for one in runs.values():  # warm: scripts loaded, connections open
            for _ in range(100):
                one()
        seen: dict[str, list[tuple[float, float]]] = {label: [] for label in runs}
        for _ in range(5):
            for label, one in runs.items():
                seen[label].append(measure(one))
        print(f"CPU per task through Celery's tracer, median of 5 runs of {N} (us): this process / the Redis server")
        base = statistics.median(cpu for cpu, _ in seen["a bare task, Celery's backend"])
        for label, values in seen.items():
            cpu, redis_cpu = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
            print(f"    {label:38} {cpu:7.1f} / {redis_cpu:6.1f}   ({cpu / base:.2f} x the bare task)")
        profiler = Profiler(interval=0.0002)
        profiler.start()
        for _ in range(N):
            runs["hypha.noop"]()
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
