"""Where a no-op hypha task spends its time: pyinstrument over the task body, in process.

``python -m bench.profile_noop`` runs ``hypha.noop`` through Celery's eager
path (no broker) against an embedded Redis for the ledger, and prints
pyinstrument's call tree; with ``--plain`` it times the same number of calls
to a bare Celery task for scale.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

N = int(os.environ.get("HYPHA_PROFILE_CALLS", "3000"))


def main() -> int:
    from pyinstrument import Profiler

    from hypha_celery.config import parse_config
    from hypha_celery.resources.capabilities import node_capacity
    from hypha_celery.tools.embedded_redis import EmbeddedRedis
    from hypha_celery.worker.bootsteps import bind_tasks
    from hypha_celery.worker.context import NodeContext

    with EmbeddedRedis() as server:
        os.environ["HYPHA_REGISTRY_URL"] = server.url
        cfg = parse_config({"worker": {
            "models": {"model_dir": tempfile.mkdtemp(prefix="hypha-profile-")},
            "security": {"verify_task_signatures": False},
            "monitoring": {"collect_metrics": False},
            "resources": {"node_id": "profile"},
        }})
        ctx = NodeContext.build(cfg)
        ctx.ledger.set_capacity(node_capacity(cfg))
        from hypha_celery.celery import app
        from hypha_celery.tasks.noop import noop

        bind_tasks(app, ctx)

        app.conf.update(task_always_eager=True, result_backend=server.url, broker_url=server.url)
        kwargs = {"requirements": {"cpu_cores": 0.01, "memory": "1MB"}}
        for _ in range(100):
            noop.apply(kwargs=kwargs)
        profiler = Profiler(interval=0.0002)
        started = time.perf_counter()
        profiler.start()
        for _ in range(N):
            noop.apply(kwargs=kwargs)
        profiler.stop()
        per_call = (time.perf_counter() - started) / N * 1e6
        print(profiler.output_text(unicode=False, color=False, show_all=False))
        print(f"hypha.noop through the eager path: {per_call:.0f} us per call (profiled)")

        @app.task(name="profile.plain")
        def plain(**_: object) -> None:
            return None

        started = time.perf_counter()
        for _ in range(N):
            plain.apply(kwargs=kwargs)
        print(f"a bare Celery task through the eager path: {(time.perf_counter() - started) / N * 1e6:.0f} us per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
