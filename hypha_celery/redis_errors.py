"""What a Redis outage becomes: one :class:`~hypha_celery.errors.RegistryUnavailable`.

Callers of the ledger, placement, registry and nonce store see hypha's own
error tree, never redis-py's. Everything else redis-py raises (a Lua error, a
wrong-type reply) is a bug or a refusal and passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from hypha_celery.errors import RegistryUnavailable

__all__ = ["redis_errors"]


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Turn a Redis connection error or timeout inside into ``RegistryUnavailable("<what>: <reason>")``.

    Works as a ``with`` block or as a decorator.
    """
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RegistryUnavailable(f"{what}: {exc}") from None
