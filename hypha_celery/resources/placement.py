"""Choosing a worker for a task: best fit over the ledger's live free-resource indexes.

The ledger's Lua scripts keep ``hypha:index:free_*`` exact on every reserve
and release, so placement reads the truth without scanning worker hashes:
``lua/place.lua`` walks the index of the scarcest resource the task asks for
(GPU memory, else memory, else cores) upwards from the request, so the first
node that fits every dimension is the tightest fit - big holes stay free for
big tasks. It then picks a live worker of that node. When some index's best
score is below what the task asks, it answers "nothing fits" without walking
(the walk would find nothing either). With 100,000 registered nodes this is one
Redis round trip of a few sorted-set lookups (``make bench``, step 3).

A request for a model prefers the workers that hold it, from the registry's
model indexes (:mod:`hypha_celery.registry.record`), best first: the model in
a serving cache, an adapter's base in a serving cache, the model in the store,
the adapter's base in the store; within a tier the tightest fit wins. Only
when no holder fits now does best fit over every node decide. The model
indexes hold membership only; a holder counts while the live index
(``hypha:workers``) says its record is live, and one whose record is gone is
dropped from the index when placement meets it. One more round
trip reads an adapter's base (``hypha:adapter_bases``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from hypha_celery import keys, lua
from hypha_celery.errors import InsufficientCapabilities
from hypha_celery.keys import KeySchema
from hypha_celery.redis_errors import redis_errors
from hypha_celery.resources.requirements import Requirements
from hypha_celery.units import format_size

__all__ = ["Choice", "Placement"]

SCAN_LIMIT = 2000
MODEL_TIERS = ("loaded", "stored")  # a model in a serving cache beats one only in a store
_UNREACHABLE = "registry Redis unreachable"


@dataclass(frozen=True)
class Choice:
    """A live worker, and the node whose ledger it shares."""

    node: str
    worker: str

    @property
    def queue(self) -> str:
        return keys.worker_queue(self.worker)


class Placement:
    """Reads of the placement indexes: which live worker should take a request."""

    def __init__(self, client: redis.Redis, *, schema: KeySchema | None = None) -> None:
        self.redis = client
        self.schema = schema or KeySchema.from_env()
        self._keys = list(self.schema.placement().values())
        self._node_workers = self.schema.node_workers_affixes()
        self._worker = self.schema.worker_affixes()

    def _place(self, req: Requirements, mode: str, exclude: str | None, model: str | None = None) -> Choice | None:
        args = [mode, req.memory, req.cpu_milli, req.gpus, req.gpu_memory, exclude or "", SCAN_LIMIT, *self._node_workers,
                *self._worker]
        with redis_errors(_UNREACHABLE):
            found = lua.script("place")(self.redis, [*self._keys, self.schema.workers(), *self.holders(model)],
                                        args)
        if not found:
            return None
        node, worker = (item.decode() if isinstance(item, bytes) else item for item in found)
        return Choice(node=node, worker=worker)

    def holders(self, model: str | None) -> list[str]:
        """The holder indexes a request for ``model`` prefers, best first (none without a model)."""
        if model is None:
            return []
        with redis_errors(_UNREACHABLE):
            raw = self.redis.hget(self.schema.adapter_bases(), model)
        ids = [model] if raw is None else [model, raw.decode() if isinstance(raw, bytes) else str(raw)]
        return [self.schema.model_workers(held, tier) for tier in MODEL_TIERS for held in ids]

    def choose(self, req: Requirements, *, exclude: str | None = None, model: str | None = None) -> Choice | None:
        """A live worker whose node has ``req`` free now, or ``None``: one holding ``model`` (or an
        adapter's base) if such a node fits, else the best fit."""
        return self._place(req, "free", exclude, model)

    def feasible(self, req: Requirements, *, exclude: str | None = None) -> Choice | None:
        """A live worker whose node could ever fit ``req`` (its capacity), or ``None``."""
        return self._place(req, "capacity", exclude)

    def any_live_worker(self) -> bool:
        """Whether any worker's record is live in the registry."""
        with redis_errors(_UNREACHABLE):
            return bool(self.redis.zcount(self.schema.workers(), time.time(), "+inf"))

    def largest(self) -> str:
        """The biggest capacity seen per resource among live nodes, for error messages."""
        indexes = self.schema.index_capacity()
        with redis_errors(_UNREACHABLE), self.redis.pipeline(transaction=False) as pipe:
            for index in indexes.values():
                pipe.zrevrange(index, 0, 0, withscores=True)
            tops: list[Any] = pipe.execute()
        parts = []
        for name, top in zip(indexes, tops, strict=True):
            value = int(top[0][1]) if top else 0
            parts.append(f"{name.replace('_', ' ')} {format_size(value) if 'memory' in name else value}")
        return ", ".join(parts)

    def infeasible(self, req: Requirements) -> InsufficientCapabilities:
        """The error for a request no live node could ever fit."""
        return InsufficientCapabilities(
            f"no live worker can ever fit {req.describe()}; the largest seen has {self.largest()}"
        )
