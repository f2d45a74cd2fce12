"""Every command a Redis server runs while a block of code runs, read with ``MONITOR``.

How the benchmarks and the round-trip tests count Redis commands exactly: a thread holds a
``MONITOR`` connection from before the block until an ``ECHO`` of a unique marker sent after it, so
nothing the block caused is missed and nothing after it is counted.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

__all__ = ["monitored"]


@contextmanager
def monitored(url: str, timeout: float = 30) -> Iterator[list[dict[str, Any]]]:
    """The commands the Redis at ``url`` runs while inside, as redis-py's ``MONITOR`` entries (``command``,
    ``client_type``: ``"lua"`` for those a script ran, ``client_address``, ``client_port``); complete once the block
    has ended (read the list after it)."""
    client = redis.Redis.from_url(url)
    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    end = f"hypha-monitor-end-{uuid.uuid4().hex}"  # sent last: the watcher reads up to it, missing nothing

    def watch() -> None:
        with client.monitor() as monitor:
            ready.set()
            while True:
                command = monitor.next_command()
                if end in command["command"]:
                    return
                seen.append(command)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    if not ready.wait(10):
        client.close()
        raise TimeoutError(f"MONITOR on {url} did not start")
    try:
        yield seen
    finally:
        client.echo(end)
        thread.join(timeout)
        client.close()
