"""What every ``make bench`` figure shares: results, formatting, and the worker processes it starts."""

from __future__ import annotations

import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from hypha_celery.harness.launch import WorkerProcess
from hypha_celery.harness.local_node import LocalNode, wait_answering

__all__ = ["REPEATS", "RESULTS", "ROOT", "fmt", "hypha_config", "record", "say", "spread", "start_worker", "throughput",
           "wait_ready"]

ROOT = Path(__file__).resolve().parent.parent
REPEATS = int(os.environ.get("HYPHA_BENCH_REPEATS", "3"))
RESULTS: dict[str, Any] = {}


def say(text: str = "") -> None:
    print(text, flush=True)


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def record(name: str, *, ratio: float, target: str, met: bool, unit: str, **detail: Any) -> None:
    RESULTS[name] = {"ratio": ratio, "target": target, "met": met, "unit": unit, **detail}


def fmt(values: list[float], unit: str, scale: float = 1.0) -> str:
    s = spread([v * scale for v in values])
    return f"min {s['min']:9.1f}  median {s['median']:9.1f}  max {s['max']:9.1f} {unit}"


# --- processes ---------------------------------------------------------------------------------------

def start_worker(app: str, url: str, workdir: Path, *, config: dict[str, Any] | None = None,
                 queues: str | None = None, concurrency: int = 4, broker: str | None = None,
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> WorkerProcess:
    """A worker (hypha's or the plain Celery app's) on ``concurrency`` threads, logging warnings only.

    Started by the harness's :class:`~hypha_celery.harness.local_node.LocalNode` on ``url`` (its result backend
    and registry; its broker too unless ``broker`` is given); the caller stops it.
    """
    node = LocalNode(url, workdir, loglevel="warning", cwd=ROOT, name="bench")
    return node.start_worker(config, name=f"bench-{uuid.uuid4().hex[:6]}", app=app, broker=broker, wait=None, env=env,
                             args=["-P", "threads", "-c", str(concurrency), *args, *(["-Q", queues] if queues else [])])


def wait_ready(worker: WorkerProcess, app: Any) -> None:
    """Until the worker answers a ping (at level warning it logs no ``ready.`` line)."""
    try:
        wait_answering(worker, app)
    except (RuntimeError, TimeoutError) as exc:
        raise SystemExit(f"bench worker did not start: {exc}") from None


def throughput(app: Any, name: str, kwargs: dict[str, Any], count: int, queue: str) -> float:
    """Tasks per second for ``count`` tasks sent at once, until the last result is in."""
    started = time.perf_counter()
    results = [app.send_task(name, kwargs=kwargs, queue=queue) for _ in range(count)]
    for result in results:
        result.get(timeout=300)
    return count / (time.perf_counter() - started)


def hypha_config(models: Path, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "max_concurrent_tasks": 4,
        "max_memory_per_task": "1GB",
        "task_timeout": 120,
        "model_cache_size": "1GB",
        "models": {"model_dir": str(models), "max_model_size": "500MB"},
        "security": {"verify_task_signatures": False},
        "monitoring": {"collect_metrics": False},
        "resources": {"node_id": f"bench-{uuid.uuid4().hex[:6]}", "memory": "8GB"},
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config
