"""Who trains in a DiLoCo round: the live workers, and the shard each one takes.

A job's shards and its workers need not match, nor stay the same: a worker may join mid-job, another
may vanish. So the scheduler decides each round anew, when it starts:

* **members** (:func:`registry_members`): the workers whose registry record is live now, that
  advertise DiLoCo's shared storage (``shared_storage = 1`` in their record) and whose per-task caps
  fit the inner task's requirements, sorted by worker id. A worker that registered while round ``r``
  ran is a member of round ``r + 1``: it fetches that round's global version from the shared storage
  like any model. One whose record expired is no longer one; a task already sent to its own queue is
  moved to the shared queue by the sweeper (:mod:`hypha_celery.worker.sweeper`), so it still runs.
* **assignment** (:func:`assign`): one inner task per member, each on its own queue, at most one per
  shard; shards are taken round-robin across rounds (a cursor the job keeps), so with more shards
  than workers every shard is trained as often as the others, a few per round. A round that needs
  more deltas than there are members (``min_workers``) sends the rest to the shared queue, where any
  worker takes them; a round with no member known (a registry that cannot be read, workers that do
  not advertise) sends every shard there, as a job did before membership existed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypha_celery.resources.requirements import Requirements

__all__ = ["Assignment", "Member", "Members", "assign", "fits", "registry_members"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """A live worker that can take an inner task: its id and its own queue."""

    worker: str
    queue: str


@dataclass(frozen=True)
class Assignment:
    """One inner task of a round: the shard it trains and the queue it is sent to (``worker`` None: any worker)."""

    shard: int
    queue: str
    worker: str | None = None


Members = Callable[[], list[Member]]


def assign(shards: int, members: Sequence[Member], *, cursor: int, at_least: int, shared_queue: str,
           turn: int = 0) -> list[Assignment]:
    """The round's inner tasks: shard ``(cursor + i) % shards`` for the ``i``-th of them.

    One per member (by worker id), at most ``shards``; at least ``at_least`` (the round's quorum), the
    ones beyond the members on ``shared_queue``. Without members, every shard on ``shared_queue``. With
    more members than shards, round ``turn`` starts at member ``turn x shards`` (mod their number), so
    every member gets its turn, a late joiner too.
    """
    if shards < 1:
        raise ValueError("a round needs at least one shard")
    ordered = sorted(members, key=lambda m: m.worker)
    if not ordered:
        return [Assignment(shard=(cursor + i) % shards, queue=shared_queue) for i in range(shards)]
    if len(ordered) > shards:
        start = (turn * shards) % len(ordered)
        ordered = ordered[start:] + ordered[:start]
    count = min(shards, max(len(ordered), at_least))
    out = []
    for i in range(count):
        shard = (cursor + i) % shards
        if i < len(ordered):
            out.append(Assignment(shard=shard, queue=ordered[i].queue, worker=ordered[i].worker))
        else:
            out.append(Assignment(shard=shard, queue=shared_queue))
    return out


def fits(record: Mapping[str, Any], req: Requirements) -> bool:
    """Whether a worker's record says it takes DiLoCo tasks (shared storage) and its caps fit ``req``."""
    if str(record.get("shared_storage", "0")) != "1":
        return False
    try:
        cores = float(record.get("max_cpu_cores_per_task", 0) or 0)
        memory = int(record.get("max_memory_per_task", 0) or 0)
        gpus = len(record.get("gpus") or [])
    except (TypeError, ValueError):
        return False
    if cores and req.cpu_cores > cores:
        return False
    if memory and req.memory > memory:
        return False
    return req.gpus <= gpus


def registry_members(requirements: Mapping[str, Any] | None, *, client: Any = None) -> Members:
    """Members read from the registry (``client``, else the scheduler's placement Redis) at each call."""
    req = Requirements.parse(requirements)

    def members() -> list[Member]:
        from hypha_celery import registry
        from hypha_celery.errors import HyphaError

        try:
            redis_client = client
            if redis_client is None:
                from hypha_celery.routing import placement_for

                redis_client = placement_for().redis
            records = registry.list_workers(redis_client, live_usage=False)
        except HyphaError as exc:
            log.warning("DiLoCo: cannot read the live workers (%s); this round goes to the shared queue", exc)
            return []
        return [Member(worker=str(r["worker_id"]), queue=str(r["queue"])) for r in records
                if r.get("worker_id") and r.get("queue") and fits(r, req)]

    return members
