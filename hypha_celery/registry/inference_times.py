"""Moving averages of task durations per model, advertised in the worker's record."""

from __future__ import annotations

import json
import math
import threading
import time

import redis

from hypha_celery import lua
from hypha_celery.errors import RegistryUnavailable
from hypha_celery.keys import KeySchema
from hypha_celery.redis_errors import redis_errors

__all__ = ["EMA_ALPHA", "InferenceTimes"]

EMA_ALPHA = 0.2


class InferenceTimes:
    """Moving averages of task durations per model, kept in this process.

    ``observe`` costs no I/O; ``flush`` writes them into the worker's record
    (at most once per ``every`` seconds unless forced), so the average is
    advertised without a Redis round trip per task.
    """

    def __init__(self, alpha: float = EMA_ALPHA, every: float = 1.0, *, schema: KeySchema | None = None) -> None:
        self.alpha = alpha
        self.every = every
        self.schema = schema or KeySchema.from_env()
        self._averages: dict[str, float] = {}
        self._dirty = False
        self._flushed = -math.inf  # the first flush always writes (monotonic time starts at boot)
        self._lock = threading.Lock()

    def observe(self, model: str, seconds: float) -> None:
        """Fold one task's duration into ``model``'s average (no I/O)."""
        with self._lock:
            old = self._averages.get(model)
            self._averages[model] = seconds if old is None else old + self.alpha * (seconds - old)
            self._dirty = True

    def snapshot(self) -> dict[str, float]:
        """The averages now, per model."""
        with self._lock:
            return dict(self._averages)

    def flush(self, client: redis.Redis, worker_id: str, *, force: bool = False) -> None:
        """Merge the averages into ``worker_id``'s record if they changed (and ``every`` passed, unless ``force``)."""
        with self._lock:
            now = time.monotonic()
            if not self._dirty or (not force and now - self._flushed < self.every):
                return
            averages, self._dirty, self._flushed = dict(self._averages), False, now
        try:
            with redis_errors("registry Redis unreachable"):
                lua.script("averages")(client, [self.schema.worker(worker_id)], [json.dumps(averages)])
        except RegistryUnavailable:
            with self._lock:
                self._dirty = True  # written at the next flush
            raise
