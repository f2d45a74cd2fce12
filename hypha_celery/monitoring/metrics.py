"""Prometheus metrics of a worker, with the seed's names, correct across pool processes.

The worker calls :func:`setup` before any pool process exists: it points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory *before* prometheus_client
is imported, so every process (threads, prefork children) writes its samples
there and the exporter on ``metrics_port`` sums them. A pool process that
exits is marked dead so its live gauges stop counting. Outside a worker (a
scheduler importing the tasks) nothing is set up and every hook is a no-op.

Names (``hypha_worker_*``)::

    tasks_active                      gauge    tasks past admission, not yet finished
    tasks_completed_total{task}       counter
    tasks_failed_total{task,error}    counter
    task_duration_seconds{task}       histogram (throughput = rate of its _count)
    cpu_utilization, memory_utilization            gauges 0..1 (psutil, every monitor_interval)
    gpu_utilization{device}                        gauge 0..1 (NVML)
    resources_capacity{resource}, resources_reserved{resource}, resources_free{resource}
                                      gauges from the node ledger (cpu_cores, memory_bytes, gpu<i>_memory_bytes)
    model_cache_hits_total, model_cache_misses_total, model_cache_evictions_total
    model_cache_bytes{device}         gauge
    batch_size                        histogram of inference batch sizes
    admissions_deferred_total{reason} counter (busy, not_here)
    signature_rejections_total        counter
    task_rejections_total{stage}      counter (signature, validation)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["active", "cache_event", "deferred", "rejections", "serve", "setup", "task_finished", "update_resources"]

_metrics: dict[str, Any] = {}
_owned_dir: str | None = None


def setup(directory: str | None = None) -> str:
    """Enable metrics in this process and the processes it forks; returns the multiprocess directory."""
    global _owned_dir
    path = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = _owned_dir = tempfile.mkdtemp(prefix="hypha-metrics-")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # stale samples of an earlier run
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    # prometheus_client picks its value store when first imported; Celery's CLI
    # may have imported it already (Flower's command plugin does), so pick again.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    _define()
    return path


def _define() -> None:
    from prometheus_client import Counter, Gauge, Histogram

    p = "hypha_worker_"
    _metrics.update({
        "active": Gauge(p + "tasks_active", "Tasks admitted and running", multiprocess_mode="livesum"),
        "completed": Counter(p + "tasks_completed", "Tasks that succeeded", ["task"]),
        "failed": Counter(p + "tasks_failed", "Tasks that failed", ["task", "error"]),
        "duration": Histogram(p + "task_duration_seconds", "Task run time from admission to result", ["task"],
                              buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800)),
        "cpu": Gauge(p + "cpu_utilization", "Host CPU utilisation, 0..1", multiprocess_mode="mostrecent"),
        "memory": Gauge(p + "memory_utilization", "Host memory utilisation, 0..1", multiprocess_mode="mostrecent"),
        "gpu": Gauge(p + "gpu_utilization", "GPU utilisation, 0..1 (NVML)", ["device"], multiprocess_mode="mostrecent"),
        "capacity": Gauge(p + "resources_capacity", "Node capacity in the ledger", ["resource"], multiprocess_mode="mostrecent"),
        "reserved": Gauge(p + "resources_reserved", "Reserved in the node ledger", ["resource"], multiprocess_mode="mostrecent"),
        "free": Gauge(p + "resources_free", "Free in the node ledger", ["resource"], multiprocess_mode="mostrecent"),
        "hits": Counter(p + "model_cache_hits", "Model cache hits"),
        "misses": Counter(p + "model_cache_misses", "Model cache misses (loads)"),
        "evictions": Counter(p + "model_cache_evictions", "Models evicted from the cache"),
        "cache_bytes": Gauge(p + "model_cache_bytes", "Bytes of models cached", ["device"], multiprocess_mode="livesum"),
        "batch": Histogram(p + "batch_size", "Inference batch sizes", buckets=(1, 2, 4, 8, 16, 32, 64, 128)),
        "deferred": Counter(p + "admissions_deferred", "Tasks deferred at admission", ["reason"]),
        "signature": Counter(p + "signature_rejections", "Tasks refused for their signature"),
        "rejected": Counter(p + "task_rejections", "Tasks refused before admission", ["stage"]),
    })


def enabled() -> bool:
    return bool(_metrics)


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Expose every process's samples on ``port`` (call in the worker's main process)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return start_http_server(port, addr=addr, registry=registry)


def cache_totals() -> dict[str, int]:
    """Model cache hits and misses summed over every process of this worker (``{}`` without metrics)."""
    if not _metrics:
        return {}
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    totals = {"cache_hits": 0, "cache_misses": 0}
    names = {"hypha_worker_model_cache_hits_total": "cache_hits", "hypha_worker_model_cache_misses_total": "cache_misses"}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += int(sample.value)
    return totals


def process_exited(pid: int) -> None:
    if _metrics:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def teardown() -> None:
    global _owned_dir
    if _owned_dir:
        shutil.rmtree(_owned_dir, ignore_errors=True)
        _owned_dir = None


@contextmanager
def active() -> Iterator[None]:
    gauge = _metrics.get("active")
    if gauge is None:
        yield
        return
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


@contextmanager
def rejections(stage: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        if _metrics:
            _metrics["rejected"].labels(stage).inc()
            if stage == "signature":
                _metrics["signature"].inc()
        raise


def deferred(reason: BaseException) -> None:
    if _metrics:
        _metrics["deferred"].labels("not_here" if type(reason).__name__ == "NotHere" else "busy").inc()


def task_finished(task: str, runtime: float | None, error: str | None) -> None:
    if not _metrics:
        return
    if error is None:
        _metrics["completed"].labels(task).inc()
    else:
        _metrics["failed"].labels(task, error).inc()
    if runtime is not None:
        _metrics["duration"].labels(task).observe(runtime)


def cache_event(*, hit: bool, batch_size: int) -> None:
    if _metrics:
        _metrics["hits" if hit else "misses"].inc()
        _metrics["batch"].observe(batch_size)


def cache_changed(device: str, size: int, evicted: int) -> None:
    if _metrics:
        _metrics["cache_bytes"].labels(device).set(size)
        if evicted:
            _metrics["evictions"].inc(evicted)


def update_resources(usage: Any, cpu: float, memory: float, gpus: dict[int, float]) -> None:
    """Refresh the gauges (the worker's monitor timer, every ``monitor_interval``)."""
    if not _metrics:
        return
    _metrics["cpu"].set(cpu)
    _metrics["memory"].set(memory)
    for index, value in gpus.items():
        _metrics["gpu"].labels(str(index)).set(value)
    cap = usage.capacity
    if cap is None:
        return
    rows = [("cpu_cores", float(len(cap.cores)), usage.cores_used), ("memory_bytes", float(cap.memory), float(usage.memory_used))]
    rows += [(f"gpu{g}_memory_bytes", float(total), float(usage.gpu_memory_used.get(g, 0))) for g, total in cap.gpus.items()]
    for resource, total, used in rows:
        _metrics["capacity"].labels(resource).set(total)
        _metrics["reserved"].labels(resource).set(used)
        _metrics["free"].labels(resource).set(total - used)
