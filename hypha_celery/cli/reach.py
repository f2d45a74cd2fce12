"""Whether the Redis (or RabbitMQ) a CLI command needs answers: one line in seconds, not a hang and a traceback.

A scheduler process retries its broker and result backend for as long as it lives; a
person at a shell wants to hear at once that nothing listens where the command looked,
and where that address came from. :func:`cli_app` is the app the ``run`` commands send
with (short connect timeouts, no retries), :func:`check_reachable` pings its broker and
result backend first, and :func:`unreachable` words the line for any of them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["CONNECT_TIMEOUT_S", "HINT", "Unreachable", "check_reachable", "cli_app", "unreachable"]

# Long enough for a Redis across a WAN; short enough that a typo'd address answers within seconds.
CONNECT_TIMEOUT_S = 2.0
HINT = "or run `hypha-celery redis` and export the URL it prints"
# Where each address comes from, named in the line that says it does not answer.
_ENV = {"broker": "HYPHA_BROKER_URL", "result backend": "HYPHA_RESULT_BACKEND", "registry": "HYPHA_REGISTRY_URL"}


class Unreachable(Exception):
    """Nothing answered at an address a command needs; ``str()`` is the line to print."""


def unreachable(what: str, url: str, reason: object, option: str | None = None) -> str:
    """The one line for ``what`` (broker, result backend, registry) not answering at ``url``.

    ``option``: the command-line option that gave ``url``, if one did.
    """
    from kombu.utils.url import maybe_sanitize_url

    env = _ENV[what]
    if option:
        source = option
    elif os.environ.get(env):
        source = f"${env}"
    elif os.environ.get("HYPHA_CONFIG"):
        source = f"from $HYPHA_CONFIG={os.environ['HYPHA_CONFIG']}"
    else:
        source = f"the default: $HYPHA_CONFIG and ${env} are unset"
    also = " (and HYPHA_REGISTRY_URL alike)" if what == "broker" else ""
    kind = "RabbitMQ" if url.startswith("amqp") else "Redis"
    return (f"{what} {kind} unreachable at {maybe_sanitize_url(url)} ({source}): {_short(reason)}; "
            f"point {env}{also} at your {kind}, {HINT}")


def _short(reason: object) -> str:
    """An exception as its last line, without the library's trailing full stop."""
    text = str(reason).strip()
    return (text.splitlines()[-1] if text else type(reason).__name__).rstrip(".")


def cli_app(broker: str | None = None) -> Celery:
    """The app a ``run`` command sends with: connects time out after ``CONNECT_TIMEOUT_S``, nothing is retried."""
    from hypha_celery.celery import create_app

    app = create_app()
    if broker is not None:
        app.conf.broker_url = broker
        app.conf.result_backend = broker
    conf = app.conf
    conf.update(
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=0,
        task_publish_retry=False,
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        broker_transport_options={**(conf.broker_transport_options or {}),
                                  "socket_connect_timeout": CONNECT_TIMEOUT_S},
        result_backend_transport_options={**(conf.result_backend_transport_options or {}),
                                          "retry_policy": {"max_retries": 0}},
    )
    return app


def check_reachable(app: Celery, option: str | None = None) -> None:
    """Raise :class:`Unreachable` unless the app's broker (one of its failover URLs) and result backend answer."""
    brokers = [url for url in str(app.conf.broker_url or "").split(";") if url]
    answered, failures = None, []
    for url in brokers:
        try:
            _ping(url)
        except Exception as exc:  # any failure to connect: refused, timed out, bad credentials, DNS
            failures.append((url, exc))
            continue
        answered = url
        break
    if answered is None and failures:
        raise Unreachable(unreachable("broker", *failures[0], option))
    backend = str(app.conf.result_backend or "")
    if backend != answered and backend.startswith(("redis://", "rediss://", "unix://")):
        try:
            _ping(backend)
        except Exception as exc:  # as above
            raise Unreachable(unreachable("result backend", backend, exc, option)) from None


def _ping(url: str) -> None:
    """One connection and one round trip to ``url``, bounded by ``CONNECT_TIMEOUT_S``."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=CONNECT_TIMEOUT_S) as connection:
        connection.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_S)

