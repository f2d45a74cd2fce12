"""Which queued requests run together on a serving executor, and when: the batching policy.

The pool's lanes (:mod:`hypha_celery.executor.pool`) own the threads, the executors and the
answers; this module owns only the decisions, as pure code (no processes, no threads, time
from a clock handed in), so every rule is unit-tested without spawning an interpreter.

The rules, as Triton's dynamic batcher (``max_queue_delay_microseconds``):

- Requests that may share a batch have equal :class:`BatchKey`: the same model, or adapters
  of one base and that base (each row runs with its own adapter); for generations also the
  same sampling settings. A request with no key runs alone: a model that cannot batch, or a
  seeded sampled generation (its seed must repeat).
- The oldest queued request heads the next batch; later requests with its key join it, in
  arrival order, up to the kind's ``max_size``. The batch is due when it is full or when its
  head has waited ``max_delay_s``. Requests of other keys wait behind the head (first come,
  first served), so no key starves another.
- A batch that failed as one is run again in smaller groups so that only the request at fault
  fails (:func:`retry_groups`): one request at a time after the executor died, one model at a
  time when a mixed batch failed (an adapter that cannot attach).

With continuous batching (``[worker.generation] batching = "continuous"``, the default) a
generation that :func:`continuous` accepts leaves the queue at once (no key: alone, due now) and
joins the serving executor's running decode loop (:mod:`hypha_celery.executor.continuous`); the
rules above keep forming inference batches and the static generation batches of what the loop
does not take.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from hypha_celery import errors

__all__ = [
    "BatchKey",
    "BatchLimits",
    "BatchPolicy",
    "BatchQueue",
    "Batcher",
    "by_model",
    "continuous",
    "generation_key",
    "infer_key",
    "mixed_models",
    "retry_groups",
]

T = TypeVar("T")

BatchKind = Literal["infer", "generate"]

# After these the executor was killed: the requests of its batch are retried one at a time.
_EXECUTOR_LOST = (errors.MemoryLimitExceeded, errors.ExecutorCrashed)


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to run in one batch."""

    kind: BatchKind
    family: str  # the model, or the base that adapters share with it
    params: str = ""  # a generation's sampling settings, as canonical JSON


def infer_key(model: str, family: str | None, batchable: bool) -> BatchKey | None:
    """An inference request's key; None (runs alone) for a model that cannot batch.

    ``family``: an adapter's base id (or a base's own id); None for a model outside any family.
    """
    return BatchKey("infer", family or model) if batchable else None


def generation_key(model: str, family: str | None, params: Mapping[str, Any]) -> BatchKey | None:
    """A generation's key: its family and sampling settings; None (runs alone) when sampling is seeded."""
    if params.get("do_sample") and params.get("seed") is not None:
        return None
    return BatchKey("generate", family or model, json.dumps(params, sort_keys=True))


def continuous(params: Mapping[str, Any], family: str | None) -> bool:
    """Whether a generation joins the serving executor's running batch instead of a static batch.

    Not a proof (captured from transformers' ``generate``), not a LoRA adapter (``family``, its base:
    adapters of one base share static batches, each row with its own adapter). The executor sends
    what its engine cannot serve (a sliding-window model) down the static path itself.
    """
    return not params.get("proof") and family is None


@dataclass(frozen=True)
class BatchLimits:
    """How large a batch may grow and how long its oldest request waits for it to fill."""

    max_size: int
    max_delay_s: float


_ALONE = BatchLimits(max_size=1, max_delay_s=0.0)


@dataclass(frozen=True)
class BatchPolicy:
    """Each kind's batch limits."""

    infer: BatchLimits
    generate: BatchLimits

    @classmethod
    def uniform(cls, max_size: int, max_delay_s: float) -> BatchPolicy:
        """The same limits for inference and generation (the worker's ``max_batch_size``, ``max_queue_delay``)."""
        limits = BatchLimits(max_size, max_delay_s)
        return cls(infer=limits, generate=limits)

    def limits(self, key: BatchKey | None) -> BatchLimits:
        if key is None:
            return _ALONE
        return self.infer if key.kind == "infer" else self.generate


class Batcher(Protocol[T]):
    """What a lane needs of a batching policy: queue requests, say when the next batch is due, hand it out.

    Not thread-safe: the lane calls it under its own lock.
    """

    def push(self, item: T, key: BatchKey | None) -> None:
        """Queue ``item``; a None key runs it alone."""

    def due_in(self) -> float | None:
        """Seconds until the next batch is due (0 or less: now); None when nothing is queued."""

    def pop(self) -> list[T]:
        """Take the next batch off the queue (whether or not it is due); at least one item."""

    def __len__(self) -> int: ...


@dataclass
class _Entry(Generic[T]):
    item: T
    key: BatchKey | None
    enqueued: float


class BatchQueue(Generic[T]):
    """Static batching by key, in arrival order, as the module docstring says. A :class:`Batcher`."""

    def __init__(self, policy: BatchPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._entries: deque[_Entry[T]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, item: T, key: BatchKey | None) -> None:
        self._entries.append(_Entry(item, key, self._clock()))

    def due_in(self) -> float | None:
        if not self._entries:
            return None
        head = self._entries[0]
        limits = self.policy.limits(head.key)
        if limits.max_size <= 1:
            return 0.0
        if sum(1 for entry in self._entries if entry.key == head.key) >= limits.max_size:
            return 0.0
        return head.enqueued + limits.max_delay_s - self._clock()

    def pop(self) -> list[T]:
        head = self._entries.popleft()
        limit = self.policy.limits(head.key).max_size
        batch = [head.item]
        if head.key is not None:
            for entry in list(self._entries):
                if len(batch) >= limit:
                    break
                if entry.key == head.key:
                    batch.append(entry.item)
                    self._entries.remove(entry)
        return batch


def mixed_models(models: Sequence[str]) -> list[str] | None:
    """Each row's model for a batch that mixes adapters of one base; None when every row asks for one model."""
    return list(models) if len(set(models)) > 1 else None


def by_model(batch: Sequence[T], model_of: Callable[[T], str]) -> list[list[T]]:
    """The batch split into one group per model, in order of each model's first request."""
    groups: dict[str, list[T]] = {}
    for item in batch:
        groups.setdefault(model_of(item), []).append(item)
    return list(groups.values())


def retry_groups(batch: Sequence[T], error: errors.HyphaError, model_of: Callable[[T], str]) -> list[list[T]]:
    """The groups to run again after ``batch`` failed as one with ``error``; empty: each request fails with it.

    An executor that died (a crash, the memory limit) is retried one request at a time, so only
    the request that killed it fails; a mixed batch that failed otherwise (an adapter that cannot
    attach) one model at a time. A timeout, or any failure of a lone request or a one-model batch,
    is that batch's answer.
    """
    if isinstance(error, _EXECUTOR_LOST):
        return [[item] for item in batch] if len(batch) > 1 else []
    if isinstance(error, errors.TaskTimeout):
        return []
    groups = by_model(batch, model_of)
    return groups if len(groups) > 1 else []
