"""What this worker has: the seed's ``WorkerCapabilities``, and the node capacity the ledger offers.

Detection uses psutil and NVML only (:mod:`hypha_celery.resources.gpu`); it never
imports torch, so calling it in the worker's parent creates no CUDA context.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import ConfigError
from hypha_celery.resources.gpu import GpuInfo, list_gpus
from hypha_celery.resources.ledger import Capacity
from hypha_celery.units import format_size

__all__ = ["WorkerCapabilities", "detect_capabilities", "memory_limit", "node_capacity"]


@dataclass(frozen=True)
class WorkerCapabilities:
    """The seed's record: hardware, models, and performance characteristics."""

    cpu_cores: int
    total_memory: int
    available_memory: int
    gpus: list[GpuInfo]
    models: list[str]
    max_concurrent_tasks: int
    avg_inference_time: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpus"] = [gpu.to_json() for gpu in self.gpus]
        return data


def _usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def memory_limit() -> int:
    """Physical memory, or less when this process's cgroup caps it (containers, systemd slices)."""
    total = psutil.virtual_memory().total
    try:
        with open("/proc/self/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return total
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            files = [f"/sys/fs/cgroup{p}/memory.max" for p in _ancestors(path)]
        elif "memory" in controllers.split(","):  # cgroup v1
            files = [f"/sys/fs/cgroup/memory{p}/memory.limit_in_bytes" for p in _ancestors(path)]
        else:
            continue
        for file in files:
            try:
                with open(file) as handle:
                    value = handle.read().strip()
            except OSError:
                continue
            if value.isdigit():
                total = min(total, int(value))
    return total


def _ancestors(path: str) -> list[str]:
    parts = [part for part in path.split("/") if part]
    return ["/" + "/".join(parts[:i]) if i else "" for i in range(len(parts), -1, -1)]


def node_capacity(cfg: WorkerConfig, gpus: list[GpuInfo] | None = None) -> Capacity:
    """The node's offer to the ledger: detected hardware, narrowed by ``[worker.resources]``."""
    cores = _usable_cores()
    if cfg.resources.cpu_cores is not None:
        if cfg.resources.cpu_cores > len(cores):
            raise ConfigError(
                "worker.resources.cpu_cores",
                f"{cfg.resources.cpu_cores} is more than the {len(cores)} cores this process may use",
            )
        cores = cores[: cfg.resources.cpu_cores]
    total = memory_limit()
    memory = cfg.resources.memory if cfg.resources.memory is not None else total
    if memory > total:
        raise ConfigError(
            "worker.resources.memory",
            f"{format_size(memory)} is more than this machine (or its cgroup) allows: {format_size(total)}",
        )
    found = {gpu.index: gpu.memory for gpu in (list_gpus() if gpus is None else gpus)}
    if cfg.resources.gpus is not None:
        missing = [index for index in cfg.resources.gpus if index not in found]
        if missing:
            raise ConfigError(
                "worker.resources.gpus",
                f"GPU(s) {missing} not found (NVML reports {sorted(found) or 'none'})",
            )
        found = {index: found[index] for index in cfg.resources.gpus}
    return Capacity(cores=cores, memory=memory, gpus=found, gpu_sharing=cfg.execution.gpu_sharing,
                    kv_budget=cfg.generation.kv_budget or 0)


def detect_capabilities(
    cfg: WorkerConfig,
    models: list[str],
    avg_inference_time: Mapping[str, float] | None = None,
    capacity: Capacity | None = None,
) -> WorkerCapabilities:
    """The seed's ``WorkerCapabilities`` for this worker, read now."""
    capacity = capacity or node_capacity(cfg)
    memory = psutil.virtual_memory()
    all_gpus = list_gpus()
    gpus = [gpu for gpu in all_gpus if gpu.index in capacity.gpus]
    return WorkerCapabilities(
        cpu_cores=len(capacity.cores),
        total_memory=capacity.memory,
        available_memory=min(capacity.memory, memory.available),
        gpus=gpus,
        models=models,
        max_concurrent_tasks=cfg.max_concurrent_tasks,
        avg_inference_time=dict(avg_inference_time or {}),
    )
