"""The network as the gateway sees it: signed submissions through :mod:`hypha_celery.client`, results, streams.

Every call here blocks (Celery and redis-py are synchronous); the ASGI app runs them
in its thread pool, so the event loop never waits on Redis. Tasks are sent with
:func:`hypha_celery.client.submit`, signed with the gateway's key, so workers verify
them like any scheduler's. Text deltas come from ``hypha_celery.client.stream`` (the
task's token stream, read with blocking ``XREAD`` in a pool thread). The model list is
the registry's, read at most once a second however many requests ask.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import nacl.signing
import redis
from celery import Celery

from hypha_celery import client as hypha_client
from hypha_celery.client import HyphaResult
from hypha_celery.errors import InvalidInput
from hypha_celery.keys import KeySchema
from hypha_celery.registry.record import list_workers

__all__ = ["Network"]

_MODELS_TTL_S = 1.0


class Network:
    """Submit, wait, stream and revoke hypha tasks, and list the models live workers hold."""

    def __init__(
        self,
        *,
        signing_key: nacl.signing.SigningKey | None,
        registry: redis.Redis,
        timeout: float,
        app: Celery | None = None,
        schema: KeySchema | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.signing_key = signing_key
        self.registry = registry
        self.timeout = timeout
        self.app = app
        self.schema = schema or KeySchema.from_env()
        self.clock = clock
        self._models: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._lock = threading.Lock()

    def submit(self, task: str, kwargs: dict[str, Any]) -> HyphaResult:
        """Place, sign and send one task (``InsufficientCapabilities`` when no live worker could ever fit it)."""
        return hypha_client.submit(task, app=self.app, signing_key=self.signing_key, **kwargs)

    def wait(self, result: HyphaResult) -> dict[str, Any]:
        """The task's result; its named error when it failed, Celery's ``TimeoutError`` past the gateway's timeout."""
        value = result.get(timeout=self.timeout, propagate=True)
        if not isinstance(value, dict) or not isinstance(value.get("output"), dict):
            raise InvalidInput(f"task {result.id} answered no output")
        return value

    def deltas(self, result: HyphaResult) -> Iterator[str]:
        """The text the task generates, as it grows (its token stream: :func:`hypha_celery.client.stream`); the
        task's error when it failed. Its outcome (finish reason, usage) comes from :meth:`wait`."""
        return hypha_client.stream(result, timeout=self.timeout)

    def revoke(self, result: HyphaResult) -> None:
        """Stop a task whose client left: a queued one never runs (so it never reserves anything). Workers run
        tasks in threads, which cannot be terminated: a running generation ends at its token bound."""
        result.revoke(terminate=False)

    def models(self) -> dict[str, dict[str, Any]]:
        """Each model a live worker's store holds: how many workers hold it, and how many have it loaded."""
        with self._lock:
            if self._models is not None and self.clock() - self._models[0] < _MODELS_TTL_S:
                return self._models[1]
        found: dict[str, dict[str, Any]] = {}
        for worker in list_workers(self.registry, live_usage=False, schema=self.schema):
            loaded = set(worker.get("loaded") or [])
            for model in worker.get("models") or []:
                entry = found.setdefault(model, {"workers": 0, "loaded": 0})
                entry["workers"] += 1
                entry["loaded"] += model in loaded
        with self._lock:
            self._models = (self.clock(), found)
        return found
