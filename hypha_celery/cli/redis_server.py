"""``hypha-celery redis``: a ``redis-server`` in the foreground, for anyone without a Redis.

The server itself is the developer harness's (:mod:`hypha_celery.harness.embedded_redis`), imported
only when the command runs: it needs the ``[embedded]`` extra, which the CLI names when it is missing.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import click

__all__ = ["redis_command"]


@click.command("redis")
@click.option("--port", type=int, default=None, help="Port (default: a free one).")
def redis_command(port: int | None) -> None:
    """Run an embedded redis-server in the foreground and print its URL."""
    from hypha_celery.harness.embedded_redis import EmbeddedRedis

    stop = {"now": False}

    def _stop(*_: Any) -> None:
        stop["now"] = True

    # Installed before the URL is printed: whoever reads it may stop us at once, and must not leave the server behind.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server = EmbeddedRedis(port)
    try:
        server.start()
    except RuntimeError as exc:  # no redis-server binary, or it would not start (a port taken)
        server.close()
        raise click.ClickException(str(exc)) from None
    try:
        click.echo(server.url, err=False)
        sys.stdout.flush()
        while not stop["now"] and server.process is not None and server.process.poll() is None:
            time.sleep(0.2)
    finally:
        server.close()
