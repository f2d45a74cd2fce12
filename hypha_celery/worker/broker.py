"""kombu's Redis transport, minus the way a broker outage stops the worker and a client built per command.

When the consumer loses the broker, Celery calls ``Connection.collect()`` and then
``Connection.close()``. If the outage interrupted the default channel's ``BRPOP`` read,
``collect()`` leaves that channel open but clears the transport's link to its
``Connection`` (``transport.client = None``); ``close()`` then closes the channel, which
restores its unacknowledged messages through a new connection pool built from
``transport.client``: ``AttributeError: 'NoneType' object has no attribute 'hostname'``
in ``_connparams`` (the kombu #582/#970 family). An ``AttributeError`` is not a
connection error, so Celery calls it unrecoverable and the worker exits. An ack of a
message delivered on that channel, made after it closed, fails the same way.

:class:`Channel` keeps the connection parameters it was opened with, so a late restore or
ack reaches the broker like any other command: it succeeds once Redis is back (a task
that finishes after the outage is acknowledged, not redelivered later), and while Redis is
down it fails with a Redis ``ConnectionError``, which Celery's reconnect path survives by
design. Nothing is lost when a restore fails: the messages stay in kombu's unacked hash in
Redis, and a live worker restores them after ``visibility_timeout`` (a copy of a finished
task is then dropped by its stored result).

kombu's channel also builds a new ``redis.Redis`` for each command it sends outside a
pipeline it was handed (``conn_or_acquire``): every event the worker publishes, every task
message it takes (the unacked hash) and every ack. With redis-py 8 building one costs about
160 us (it fills some 170 response callbacks), paid on the worker's one event-loop thread three
to five times per task. :class:`Channel` builds one per connection pool and hands it out again
(a client on a pool is safe to share between threads: each command takes its own connection
from the pool), and a new one with a new pool (after a fork or a lost connection).

Duplicate JSON keys: kombu's reader keeps the last of two equal keys in a message's headers (the
signed envelope among them), and nothing after it could tell. :class:`Channel`'s clients read a
taken message (``BRPOP``, ``RPOP``) once more with every key pair in view and mark one that repeats a
key (:func:`hypha_celery.security.strict_json.mark_duplicates`); the task strategy refuses it.

A transport class, named by Celery's ``broker_transport`` setting, is kombu's extension
point for both: a bootstep or signal runs around the consumer, not inside
``Connection.close()``, and patching kombu's module would change every other user of it in
the process. :func:`broker_transport` says when the worker uses it: every broker URL is
``redis://`` (kombu keeps its own transport, and its TLS defaults, for ``rediss://`` and
anything else).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

from hypha_celery.security.strict_json import response_checker

__all__ = ["TRANSPORT", "Channel", "Transport", "broker_transport"]

TRANSPORT = "hypha_celery.worker.broker:Transport"


class Channel(kombu_redis.Channel):
    """A Redis channel that still reaches its broker after its connection was released, with one client per pool.

    It keeps the parameters of its first (synchronous) pool, so that a late restore or ack
    connects as any other does: to the broker if it is back, else it fails with a connection
    error. A channel that never built a pool fails with a connection error at once.
    """

    _released_params: dict[str, Any] | None = None
    _shared: tuple[Any, Any] | None = None  # (pool, the client built on it)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu's: ``client`` if given, else a client on this channel's pool (here one per pool, not per call)."""
        yield client if client else self._pooled_client()

    def _pooled_client(self) -> Any:
        pool = self.pool  # kombu builds it on first use, and again after it was dropped
        shared = self._shared
        if shared is None or shared[0] is not pool:
            shared = self._shared = (pool, self._create_client())
        return shared[1]

    def _connparams(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is not None and transport.client is not None:
            params = super()._connparams(asynchronous=asynchronous)
            if not asynchronous:
                self._released_params = dict(params)
            return params
        if not asynchronous and self._released_params is not None:
            return dict(self._released_params)
        raise RedisConnectionError("the broker connection of this channel was released (connection lost)")


    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu's client, whose ``BRPOP`` / ``RPOP`` replies mark a message that names a JSON key twice."""
        client = super()._create_client(asynchronous=asynchronous)
        callbacks = client.response_callbacks
        client.set_response_callback("BRPOP", response_checker(callbacks.get("BRPOP"), pair=True))
        client.set_response_callback("RPOP", response_checker(callbacks.get("RPOP"), pair=False))
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def broker_transport(urls: str | Sequence[str] | None) -> str | None:
    """:data:`TRANSPORT` when every broker URL is ``redis://``, else None (kombu picks by scheme)."""
    if not urls:
        return None
    listed = [u for u in urls.split(";") if u] if isinstance(urls, str) else list(urls)
    if listed and all(isinstance(u, str) and u.startswith("redis://") for u in listed):
        return TRANSPORT
    return None
