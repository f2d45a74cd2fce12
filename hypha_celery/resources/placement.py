"""Choosing a worker for a task: best fit over the ledger's live free-resource indexes.

The ledger's Lua scripts keep ``hypha:index:free_*`` exact on every reserve
and release, so placement reads the truth without scanning worker hashes:
``lua/place.lua`` walks the index of the scarcest resource the task asks for
(GPU memory, else memory, else cores) upwards from the request, so the first
node that fits every dimension is the tightest fit - big holes stay free for
big tasks. It then picks a live worker of that node. With 10,000 registered
nodes this is one Redis round trip of a few sorted-set lookups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from hypha_celery import keys
from hypha_celery import lua as redis_scripts
from hypha_celery.errors import InsufficientCapabilities, RegistryUnavailable
from hypha_celery.resources.requirements import Requirements
from hypha_celery.units import format_size

__all__ = ["Choice", "Placement"]

SCAN_LIMIT = 2000


@dataclass(frozen=True)
class Choice:
    node: str
    worker: str

    @property
    def queue(self) -> str:
        return keys.worker_queue(self.worker)


class Placement:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._script = client.register_script(redis_scripts.source("place"))
        self._keys = [*keys.INDEX_FREE.values(), *keys.INDEX_CAPACITY.values()]

    def _place(self, req: Requirements, mode: str, exclude: str | None) -> Choice | None:
        try:
            found = self._script(
                keys=self._keys,
                args=[mode, req.memory, req.cpu_milli, req.gpus, req.gpu_memory, exclude or "", keys.PREFIX, SCAN_LIMIT],
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RegistryUnavailable(f"registry Redis unreachable: {exc}") from None
        if not found:
            return None
        node, worker = (item.decode() if isinstance(item, bytes) else item for item in found)
        return Choice(node=node, worker=worker)

    def choose(self, req: Requirements, *, exclude: str | None = None) -> Choice | None:
        """A live worker whose node has ``req`` free now (best fit), or ``None``."""
        return self._place(req, "free", exclude)

    def feasible(self, req: Requirements, *, exclude: str | None = None) -> Choice | None:
        """A live worker whose node could ever fit ``req`` (its capacity), or ``None``."""
        return self._place(req, "capacity", exclude)

    def any_live_worker(self) -> bool:
        import time

        try:
            return bool(self.redis.zcount(keys.WORKERS, time.time(), "+inf"))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RegistryUnavailable(f"registry Redis unreachable: {exc}") from None

    def largest(self) -> str:
        """The biggest capacity seen per resource among live nodes, for error messages."""
        parts = []
        for name, index in keys.INDEX_CAPACITY.items():
            top: list[Any] = self.redis.zrevrange(index, 0, 0, withscores=True)
            value = int(top[0][1]) if top else 0
            parts.append(f"{name.replace('_', ' ')} {format_size(value) if 'memory' in name else value}")
        return ", ".join(parts)

    def infeasible(self, req: Requirements) -> InsufficientCapabilities:
        return InsufficientCapabilities(
            f"no live worker can ever fit {req.describe()}; the largest seen has {self.largest()}"
        )
