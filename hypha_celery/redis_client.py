"""Every registry, ledger and placement Redis client is built here: one Redis, or a Redis Cluster.

The registry URL says which: ``redis://host:6379/0`` is one server,
``redis://host:7000/0?cluster=true`` is a Redis Cluster reached through that
node (redis-py discovers the others). The flag travels with the URL, so it
means the same in ``$HYPHA_REGISTRY_URL``, ``[worker.network] registry_url``
and ``hypha workers --registry``.

A cluster needs every hypha key in one hash slot: the ledger's Lua scripts
touch a node's keys and the shared placement indexes in one atomic step, and
``place.lua`` reads keys it meets while it scans. So a cluster URL is refused
(:class:`~hypha_celery.errors.ConfigError` naming ``HYPHA_KEY_PREFIX``) unless
the prefix carries a hash tag, e.g. ``HYPHA_KEY_PREFIX={hypha}``; a worker
checks this with its config, before it starts (:func:`check_registry`).

Building a client opens no connection. redis-py's ``RedisCluster`` asks a node
for the slot map as it is constructed, so a cluster client here is a
:class:`LazyCluster` that constructs it on first use; a cluster that cannot be
reached then reads as ``redis.ConnectionError`` (a registry outage, like a
single server's).
"""

from __future__ import annotations

import threading
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from hypha_celery.errors import ConfigError
from hypha_celery.keys import PREFIX_VARIABLE, KeySchema

__all__ = ["CLUSTER_FLAG", "LazyCluster", "check_registry", "hash_tag", "registry_client", "split_cluster_flag"]

CLUSTER_FLAG = "cluster"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def split_cluster_flag(url: str) -> tuple[str, bool]:
    """``url`` without its ``cluster=`` query parameter, and whether it named a Redis Cluster."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    flags = [value.lower() for name, value in query if name == CLUSTER_FLAG]
    if not flags:
        return url, False
    if any(flag not in _TRUE + _FALSE for flag in flags):
        raise ConfigError("registry_url", f"{url!r}: cluster= takes true or false, not {flags[-1]!r}")
    rest = urlencode([(name, value) for name, value in query if name != CLUSTER_FLAG])
    return urlunsplit(parts._replace(query=rest)), flags[-1] in _TRUE


def hash_tag(prefix: str) -> str | None:
    """The hash tag every key under ``prefix`` shares (``{hypha}`` -> ``hypha``), or None when it has none."""
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    if start < 0 or end < 0 or end == start + 1:
        return None
    return prefix[start + 1:end]


def check_registry(url: str, schema: KeySchema | None = None) -> bool:
    """Whether ``url`` names a Redis Cluster; ``ConfigError`` when it does and the key prefix has no hash tag."""
    _, cluster = split_cluster_flag(url)
    prefix = (schema or KeySchema.from_env()).prefix
    if cluster and hash_tag(prefix) is None:
        raise ConfigError(
            PREFIX_VARIABLE,
            f"the registry {url!r} is a Redis Cluster, and the ledger's scripts need every hypha key in one "
            f"hash slot: set {PREFIX_VARIABLE}={{hypha}} (a prefix with a hash tag; it is {prefix!r} now)",
        )
    return cluster


class LazyCluster:
    """A ``RedisCluster`` constructed on first use, with the same methods (it forwards every attribute)."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.url = url
        self._kwargs = kwargs
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()  # tasks run in threads: only one of them constructs the client

    @property
    def cluster(self) -> RedisCluster:
        """The client, constructed now if this is its first use (``redis.ConnectionError`` when unreachable)."""
        with self._lock:
            if self._client is None:
                try:
                    self._client = RedisCluster.from_url(self.url, **self._kwargs)
                except RedisClusterException as exc:
                    raise redis.ConnectionError(f"Redis Cluster {self.url}: {exc}") from None
            return self._client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not a command; and never recurse while half-built (copy, pickle)
            raise AttributeError(name)
        return getattr(self.cluster, name)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def registry_client(
    url: str, *, timeout: float | None = None, health_check_interval: int = 0, schema: KeySchema | None = None,
) -> redis.Redis:
    """A client for the registry at ``url`` (a cluster when it says ``?cluster=true``); opens no connection.

    ``timeout`` bounds each connect and each reply. A cluster client is typed
    as ``redis.Redis``: it answers every command hypha sends (keyed commands,
    ``EVALSHA``/``SCRIPT LOAD``, single-slot pipelines and transactions).
    """
    cluster = check_registry(url, schema)
    plain, _ = split_cluster_flag(url)
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                               "health_check_interval": health_check_interval}
    if cluster:
        return cast(redis.Redis, LazyCluster(plain, **options))
    return redis.Redis.from_url(plain, **options)
