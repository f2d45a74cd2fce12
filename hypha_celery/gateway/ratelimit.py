"""A token bucket per API key in Redis, so every gateway process in front of one network shares it.

One Lua script (``token_bucket.lua``, in the house style of :mod:`hypha_celery.lua`)
refills and takes a token in one atomic step on the Redis server's clock, so gateways
on several hosts neither race nor disagree about time. The bucket's key is
``<prefix>:ratelimit:<sha256 of the API key>``; Redis never holds a key itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import redis

from hypha_celery.keys import KeySchema
from hypha_celery.lua import Script
from hypha_celery.redis_errors import redis_errors

__all__ = ["RateLimiter", "bucket_key"]


@functools.cache
def _script() -> Script:
    text = resources.files("hypha_celery").joinpath("gateway", "token_bucket.lua").read_text()
    return Script.of("token_bucket", text)


def bucket_key(schema: KeySchema, key_id: str) -> str:
    """The bucket of one API key (by its digest) under the deployment's key prefix."""
    return f"{schema.prefix}:ratelimit:{key_id}"


@dataclass
class RateLimiter:
    """``per_minute`` requests a minute for each key, at most ``burst`` at once; ``per_minute`` 0: no limit."""

    client: redis.Redis
    per_minute: int
    burst: int
    schema: KeySchema

    def take(self, key_id: str) -> float:
        """Take one request's token: 0.0 when allowed, else the seconds until the key may ask again.
        ``RegistryUnavailable`` when Redis cannot be reached."""
        if self.per_minute <= 0:
            return 0.0
        with redis_errors("the rate limiter's Redis is unreachable"):
            allowed, wait_ms = _script()(self.client, [bucket_key(self.schema, key_id)],
                                         [self.per_minute / 60.0, max(1, self.burst)])
        return 0.0 if int(allowed) else int(wait_ms) / 1000.0
