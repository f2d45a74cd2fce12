"""A task's request as a serving lane holds it, what it answers, and the limits a job runs under.

Shared by the lanes (:mod:`hypha_celery.executor.pool`), which run static batches, and by the
generations they keep in flight (:mod:`hypha_celery.executor.inflight`); kept apart so that neither
imports the other's module for its data.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from hypha_celery import errors
from hypha_celery.executor.batching import BatchKey
from hypha_celery.executor.process import ExecutorSettings
from hypha_celery.protocol import Usage
from hypha_celery.resources.ledger import Lease
from hypha_celery.work import Generate, Generated, JobLimits, Progress, Streamed

__all__ = ["KILLED", "GeneratedItem", "ItemResult", "Request", "job_limits"]

# After these the executor was killed (a deadline, a crash, the memory limit): its cache is gone.
KILLED = (errors.TaskTimeout, errors.ExecutorCrashed, errors.MemoryLimitExceeded)


@dataclass
class ItemResult:
    """One task's share of an inference job."""

    output: Any
    cache_hit: bool
    load_s: float
    compute_s: float
    batch_size: int
    memory_peak: int
    device: str
    cpu_affinity: list[int]
    gpu_memory_peak: int | None = None


@dataclass
class GeneratedItem:
    """One task's share of a generation job."""

    output: Generated
    time_to_first_token_s: float
    compute_s: float
    cache_hit: bool
    load_s: float
    batch_size: int
    usage: Usage
    dtype: str | None = None  # the loaded model's parameter dtype


@dataclass
class Request:
    """One task's work as a lane holds it; the task's thread waits on ``done`` and reads ``updates``."""

    model: str
    inputs: Any
    lease: Lease
    deadline: float
    key: BatchKey | None  # the requests it may share a batch with; None: it runs alone
    expected_size: int | None
    generate: Generate | None = None  # a generation, streaming into ``streamed``
    done: threading.Event = field(default_factory=threading.Event)
    result: ItemResult | None = None
    generated: GeneratedItem | None = None
    updates: queue.SimpleQueue[Streamed | None] = field(default_factory=queue.SimpleQueue)  # to the task's thread;
    # None: finished
    error: BaseException | None = None
    submitted: bool = False  # joins the executor's running batch (continuous batching) instead of a static one
    tag: int | None = None  # its id in the executor while submitted
    retried: bool = False  # already sent again after its executor died
    cancelled: bool = False  # its task gave up on it (revoked): it is dropped, or ended in the executor

    def finish(self, result: ItemResult | None = None, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.result, self.error = result, error
        self.done.set()
        self.updates.put(None)

    def stream(self, update: Progress | Streamed) -> None:
        if isinstance(update, Streamed):
            self.updates.put(update)


def job_limits(leases: list[Lease], settings: ExecutorSettings) -> JobLimits:
    """The limits the executor enforces on a job run for ``leases``."""
    # Affinity: the cores held alone, and for a fraction every core of the shared pool it was admitted
    # to (the kernel spreads fractions over it); threads: the cores' worth reserved, at least one.
    cores = sorted({core for lease in leases for core in lease.cores})
    milli = sum(sum(lease.cores.values()) for lease in leases)
    return JobLimits(
        memory=sum(lease.memory for lease in leases) if settings.enforce_memory else None,
        cores=cores if settings.enforce_cpu and cores else None,
        gpu_memory=sum(sum(lease.gpus.values()) for lease in leases) or None,
        threads=min(len(cores), max(1, -(-milli // 1000))) if settings.enforce_cpu and cores else None,
    )

