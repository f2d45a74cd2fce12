"""A Celery router: plain ``apply_async`` / ``send_task`` with a ``requirements`` kwarg is placed too.

Listed in ``task_routes`` (:mod:`hypha_celery.config.settings`). A hypha task without an explicit
queue goes to the queue of the best-fitting live worker (one holding its ``model``, or the
adapter's base, first); when none fits now
(or the registry cannot be read) it goes to the shared ``hypha`` queue and
the worker that takes it defers it until resources free up.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from hypha_celery.config import load_config, registry_url
from hypha_celery.errors import HyphaError
from hypha_celery.redis_client import registry_client
from hypha_celery.resources.placement import Placement
from hypha_celery.resources.requirements import SERVING_CPU_MILLI, SERVING_TASKS, Requirements

__all__ = ["placement_for", "route_by_requirements"]

log = logging.getLogger(__name__)
_lock = threading.Lock()
# Celery calls a router as a bare function (no app, no context to carry a client): one client per URL per process.
_placements: dict[str, Placement] = {}


def placement_for(url: str | None = None) -> Placement:
    """One Placement per registry URL per process."""
    url = url or registry_url(load_config())
    with _lock:
        found = _placements.get(url)
        if found is None:
            client = registry_client(url, timeout=2)
            found = _placements[url] = Placement(client)
        return found


def route_by_requirements(
    name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None, **_: Any
) -> dict[str, str] | None:
    if not name.startswith("hypha.") or options.get("queue") or options.get("routing_key"):
        return None
    try:
        req = Requirements.parse((kwargs or {}).get("requirements"),
                                 serving_cpu_milli=SERVING_CPU_MILLI if name in SERVING_TASKS else None)
    except HyphaError:
        return None  # the worker refuses it with the reason
    try:
        model = (kwargs or {}).get("model")
        choice = placement_for().choose(req, model=model if isinstance(model, str) and model else None)
    except (HyphaError, redis.RedisError) as exc:
        log.warning("placement unavailable (%s); sending %s to the shared queue", exc, name)
        return None
    return {"queue": choice.queue} if choice else None
