"""Prometheus metrics of a worker, with the seed's names, correct across pool processes.

The worker's :class:`~hypha_celery.worker.bootsteps.NodeStep` calls
:func:`prepare_multiprocess_dir` before any pool process exists: it points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory, so every process (threads,
prefork children) writes its samples there and the exporter on ``metrics_port``
sums them. It then builds one :class:`PrometheusMetrics` and hands it over in the
node context; a pool process that exits is marked dead so its live gauges stop
counting. With ``collect_metrics = false`` (and outside a worker) the context
holds a plain :class:`Metrics`, whose every hook does nothing.

Names (``hypha_worker_*``)::

    tasks_active                      gauge    tasks past admission, not yet finished
    tasks_completed_total{task}       counter  tasks that returned a result
    tasks_failed_total{task,error}    counter  tasks that ended in an error, by its class name
    task_duration_seconds{task}       histogram from the task's start on the worker to its outcome
    cpu_utilization, memory_utilization            gauges 0..1 of the host (psutil, every monitor_interval)
    gpu_utilization{device}                        gauge 0..1 (NVML)
    resources_capacity{resource}, resources_reserved{resource}, resources_free{resource}
                                      gauges from the node ledger (cpu_cores, memory_bytes, gpu<i>_memory_bytes,
                                      and each device's KV-cache budget: kv_cpu_bytes, kv_gpu<i>_bytes)
    kv_requests{device}               gauge    requests holding KV cache on a device ("cpu", "gpu<i>")
    model_cache_hits_total, model_cache_misses_total, model_cache_evictions_total
    model_cache_bytes{device}         gauge
    batch_size                        histogram of inference batch sizes
    admissions_deferred_total{reason} counter (busy, not_here)
    task_rejections_total{stage}      counter  tasks refused before admission (signature, validation);
                                               a Redis outage during a check is not a refusal
    diloco_rounds_total, diloco_bytes_moved_total, diloco_deltas_total{outcome}: DiLoCo outer steps;
    diloco_delta_bytes_total / diloco_dense_bytes_total: the deltas' compression ratio against float32;
    diloco_round_seconds              histogram of a round's slowest inner task plus its outer step
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

__all__ = ["Metrics", "PrometheusMetrics", "RefusalStage", "prepare_multiprocess_dir"]

RefusalStage = Literal["signature", "validation"]
_PREFIX = "hypha_worker_"
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800)


def prepare_multiprocess_dir(directory: str | None = None) -> tuple[str, bool]:
    """Point prometheus_client at a clean multiprocess directory; returns it and whether it is ours to remove.

    Call before any pool process is forked and before metrics are created.
    """
    path = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    owned = not path
    if not path:
        path = tempfile.mkdtemp(prefix="hypha-metrics-")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # stale samples of an earlier run
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    # prometheus_client picks its value store when first imported; Celery's CLI
    # may have imported it already (Flower's command plugin does), so pick again.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    return path, owned


class Metrics:
    """The metric hooks the worker calls; this base records nothing (metrics off, or not a worker)."""

    @contextmanager
    def active(self) -> Iterator[None]:
        """Count a task as active while inside."""
        yield

    def refused(self, stage: RefusalStage) -> None:
        """A task was refused before admission (a bad signature, invalid kwargs)."""

    def deferred(self, *, not_here: bool) -> None:
        """A task was deferred at admission: busy here, or forwarded to a node that fits it."""

    def task_finished(self, task: str, runtime: float | None, error: str | None) -> None:
        """A task ended: ``error`` is its exception's class name, ``None`` on success."""

    def cache_event(self, *, hit: bool, batch_size: int) -> None:
        """An inference was served from a warm model (hit) or after a load (miss), in a batch of ``batch_size``."""

    def cache_changed(self, device: str, size: int, evicted: int) -> None:
        """A serving executor's model cache now holds ``size`` bytes, after evicting ``evicted`` models."""

    def update_resources(self, usage: Any, cpu: float, memory: float, gpus: dict[int, float]) -> None:
        """Refresh host and ledger gauges (the worker's monitor timer)."""

    def diloco_round(self, *, bytes_moved: int, accepted: int, refused: int, delta_bytes: int = 0,
                     dense_bytes: int = 0, round_seconds: float | None = None) -> None:
        """A DiLoCo outer step applied ``accepted`` deltas (``refused`` were not) that moved ``bytes_moved``: the
        deltas' ``delta_bytes``, against ``dense_bytes`` as float32 (their ratio: the compression), in a round of
        ``round_seconds`` (its slowest inner task and this outer step)."""

    def generation_moved(self, *, resumed_from: int, restarted: bool) -> None:
        """A copy of a generation whose worker died ran here: continued after ``resumed_from`` streamed tokens, or
        ``restarted`` from the start (no usable record)."""

    def cache_totals(self) -> dict[str, int]:
        """Model cache hits and misses summed over this worker's processes (``{}`` without metrics)."""
        return {}

    def process_exited(self, pid: int) -> None:
        """A pool process exited: its live gauges stop counting."""

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Expose every process's samples on ``port``; ``None`` when there is nothing to serve."""
        return None

    def close(self) -> None:
        """Remove what this object created (its multiprocess directory)."""


class PrometheusMetrics(Metrics):
    """The worker's Prometheus metrics; build after :func:`prepare_multiprocess_dir`, once per worker.

    The metrics are not registered in prometheus_client's global registry: in
    multiprocess mode the exporter reads every process's files instead, and a
    second instance in one process (tests) does not collide.
    """

    def __init__(self, directory: str, owned: bool = False) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.directory = directory
        self._owned = owned
        p, reg = _PREFIX, None
        self.tasks_active = Gauge(p + "tasks_active", "Tasks admitted (resources reserved) and not yet finished",
                                  multiprocess_mode="livesum", registry=reg)
        self.tasks_completed = Counter(p + "tasks_completed", "Tasks that returned a result", ["task"], registry=reg)
        self.tasks_failed = Counter(p + "tasks_failed", "Tasks that ended in an error, by the error's class name",
                                    ["task", "error"], registry=reg)
        self.task_duration = Histogram(p + "task_duration_seconds",
                                       "Seconds from a task's start on this worker to its result or error",
                                       ["task"], buckets=_DURATION_BUCKETS, registry=reg)
        self.cpu = Gauge(p + "cpu_utilization", "Host CPU utilisation, 0..1 (psutil)",
                         multiprocess_mode="mostrecent", registry=reg)
        self.memory = Gauge(p + "memory_utilization", "Host memory utilisation, 0..1 (psutil)",
                            multiprocess_mode="mostrecent", registry=reg)
        self.gpu = Gauge(p + "gpu_utilization", "GPU compute utilisation, 0..1 (NVML)", ["device"],
                         multiprocess_mode="mostrecent", registry=reg)
        self.capacity = Gauge(p + "resources_capacity", "What this node offers, per resource, in the ledger",
                              ["resource"], multiprocess_mode="mostrecent", registry=reg)
        self.reserved = Gauge(p + "resources_reserved", "Held by live leases (tasks and model caches) in the ledger",
                              ["resource"], multiprocess_mode="mostrecent", registry=reg)
        self.free = Gauge(p + "resources_free", "Capacity minus reservations in the ledger", ["resource"],
                          multiprocess_mode="mostrecent", registry=reg)
        self.kv_requests = Gauge(p + "kv_requests", "Requests holding KV cache against a device's KV budget",
                                 ["device"], multiprocess_mode="mostrecent", registry=reg)
        self.cache_hits = Counter(p + "model_cache_hits", "Inferences served by an already loaded model", registry=reg)
        self.cache_misses = Counter(p + "model_cache_misses", "Inferences that had to load their model first",
                                    registry=reg)
        self.cache_evictions = Counter(p + "model_cache_evictions", "Models evicted from a model cache to make room",
                                       registry=reg)
        self.cache_bytes = Gauge(p + "model_cache_bytes", "Bytes of models held by a device's model cache", ["device"],
                                 multiprocess_mode="livesum", registry=reg)
        self.batch_size = Histogram(p + "batch_size", "Requests per forward pass of a serving executor",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=reg)
        self.admissions_deferred = Counter(p + "admissions_deferred",
                                           "Tasks deferred at admission: busy here, or forwarded (not_here)",
                                           ["reason"], registry=reg)
        self.task_rejections = Counter(p + "task_rejections",
                                       "Tasks refused before admission: bad signature or invalid arguments",
                                       ["stage"], registry=reg)
        self.generations_moved = Counter(p + "generations_moved", "Copies of generations whose worker died, run here: "
                                         "continued from their token stream, or restarted", ["outcome"], registry=reg)
        self.tokens_resumed = Counter(p + "generation_tokens_resumed", "Streamed tokens a moved generation continued "
                                      "after (not computed again)", registry=reg)
        self.diloco_rounds = Counter(p + "diloco_rounds", "DiLoCo outer steps applied by this worker", registry=reg)
        self.diloco_bytes = Counter(p + "diloco_bytes_moved",
                                    "Bytes DiLoCo's inner workers pulled (weights) and pushed (deltas) in the rounds "
                                    "this worker aggregated", registry=reg)
        self.diloco_deltas = Counter(p + "diloco_deltas", "DiLoCo deltas offered to this worker's outer steps",
                                     ["outcome"], registry=reg)
        self.diloco_delta_bytes = Counter(p + "diloco_delta_bytes", "Bytes of the DiLoCo deltas this worker's outer "
                                          "steps applied, as sent", registry=reg)
        self.diloco_dense_bytes = Counter(p + "diloco_dense_bytes", "Bytes the same DiLoCo deltas would take as float32 "
                                          "(the compression ratio's denominator)", registry=reg)
        self.diloco_round_seconds = Histogram(p + "diloco_round_seconds", "Seconds of a DiLoCo round this worker "
                                              "aggregated: its slowest accepted inner task plus the outer step",
                                              buckets=_DURATION_BUCKETS, registry=reg)

    @contextmanager
    def active(self) -> Iterator[None]:
        self.tasks_active.inc()
        try:
            yield
        finally:
            self.tasks_active.dec()

    def refused(self, stage: RefusalStage) -> None:
        self.task_rejections.labels(stage).inc()

    def deferred(self, *, not_here: bool) -> None:
        self.admissions_deferred.labels("not_here" if not_here else "busy").inc()

    def task_finished(self, task: str, runtime: float | None, error: str | None) -> None:
        if error is None:
            self.tasks_completed.labels(task).inc()
        else:
            self.tasks_failed.labels(task, error).inc()
        if runtime is not None:
            self.task_duration.labels(task).observe(runtime)

    def diloco_round(self, *, bytes_moved: int, accepted: int, refused: int, delta_bytes: int = 0,
                     dense_bytes: int = 0, round_seconds: float | None = None) -> None:
        self.diloco_rounds.inc()
        self.diloco_delta_bytes.inc(delta_bytes)
        self.diloco_dense_bytes.inc(dense_bytes)
        if round_seconds is not None:
            self.diloco_round_seconds.observe(round_seconds)
        self.diloco_bytes.inc(bytes_moved)
        self.diloco_deltas.labels("accepted").inc(accepted)
        self.diloco_deltas.labels("refused").inc(refused)

    def generation_moved(self, *, resumed_from: int, restarted: bool) -> None:
        self.generations_moved.labels("restarted" if restarted else "continued").inc()
        self.tokens_resumed.inc(resumed_from)

    def cache_event(self, *, hit: bool, batch_size: int) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()
        self.batch_size.observe(batch_size)

    def cache_changed(self, device: str, size: int, evicted: int) -> None:
        self.cache_bytes.labels(device).set(size)
        if evicted:
            self.cache_evictions.inc(evicted)

    def update_resources(self, usage: Any, cpu: float, memory: float, gpus: dict[int, float]) -> None:
        self.cpu.set(cpu)
        self.memory.set(memory)
        for index, value in gpus.items():
            self.gpu.labels(str(index)).set(value)
        cap = usage.capacity
        if cap is None:
            return
        rows = [("cpu_cores", float(len(cap.cores)), usage.cores_used), ("memory_bytes", float(cap.memory),
                                                                          float(usage.memory_used))]
        rows += [(f"gpu{g}_memory_bytes", float(total), float(usage.gpu_memory_used.get(g, 0)))
                 for g, total in cap.gpus.items()]
        for device, kv in getattr(usage, "kv", {}).items():
            name = device if device == "cpu" else f"gpu{device}"
            rows.append((f"kv_{name}_bytes", float(kv.budget), float(kv.used)))
            self.kv_requests.labels(name).set(len(kv.holders))
        for resource, total, used in rows:
            self.capacity.labels(resource).set(total)
            self.reserved.labels(resource).set(used)
            self.free.labels(resource).set(total - used)

    def _collect(self) -> Any:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        return registry

    def cache_totals(self) -> dict[str, int]:
        totals = {"cache_hits": 0, "cache_misses": 0}
        names = {_PREFIX + "model_cache_hits_total": "cache_hits", _PREFIX + "model_cache_misses_total": "cache_misses"}
        for family in self._collect().collect():
            for sample in family.samples:
                if sample.name in names:
                    totals[names[sample.name]] += int(sample.value)
        return totals

    def process_exited(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path=self.directory)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        from prometheus_client import start_http_server

        return start_http_server(port, addr=addr, registry=self._collect())

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._owned = False
