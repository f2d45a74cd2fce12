"""Packaging a task's result: its output plus what it cost.

Every ML task returns ``{"output", "model", "worker", "metrics"}``; the
metrics say how long it waited and ran, whether the model was cached, where
it ran, and what it held.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hypha_celery.resources.ledger import Lease

__all__ = ["Timing", "package"]


@dataclass
class Timing:
    """Unix times of a task's stages (``sent_at`` from the publisher, when known)."""

    started_at: float = 0.0
    finished_at: float = 0.0
    sent_at: float | None = None

    @property
    def queue_wait_s(self) -> float:
        return max(0.0, self.started_at - self.sent_at) if self.sent_at else 0.0


def package(
    *,
    output: Any,
    model: str | None,
    worker: str,
    lease: Lease,
    timing: Timing,
    load_s: float = 0.0,
    cache_hit: bool | None = None,
    memory_peak: int = 0,
    device: str | None = None,
    gpu_utilization: dict[int, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "duration_s": timing.finished_at - timing.started_at,
        "queue_wait_s": timing.queue_wait_s,
        "load_s": load_s,
        "memory_peak": memory_peak,
        "device": device or lease.device,
        "cache_hit": cache_hit,
        "started_at": timing.started_at,
        "finished_at": timing.finished_at,
        "pid": os.getpid(),
        "gpu_utilization": {str(gpu): value for gpu, value in (gpu_utilization or {}).items()} or None,
        "reserved": {
            "cpu_cores": sorted(lease.cores),
            "cpu_milli": sum(lease.cores.values()),
            "memory": lease.memory,
            "gpus": lease.gpu_ids,
            "gpu_memory": {str(gpu): size for gpu, size in lease.gpus.items()},
            "cuda_visible_devices": lease.cuda_visible_devices,
            "gpu_exclusive": lease.exclusive_gpu,
            **({"kv": lease.kv, "kv_devices": list(lease.kv_devices)} if lease.kv else {}),
        },
    }
    if extra:
        metrics.update(extra)
    return {"output": output, "model": model, "worker": worker, "metrics": metrics}
