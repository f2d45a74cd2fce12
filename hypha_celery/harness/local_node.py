"""A local node for the demo, ``make gpu-check``, the end-to-end tests and ``make bench``: one way to start one.

:func:`local_node` starts what a node on this machine needs (a Redis, embedded unless one is given; worker
configs written from ``[worker]`` tables; ``celery -A hypha_celery worker`` processes with their options),
waits for each worker (Celery's ``ready.`` line, its registry record, or an answered ping), and on the way
out stops every worker it started and the Redis it started. The handle, :class:`LocalNode`, starts more
workers as a caller needs them (a test's second worker, the GPU check's retry without the sandbox).

Worker ``NAME`` logs to ``WORKDIR/NAME.log``, and its config (when given as a table) is ``WORKDIR/NAME.toml``.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hypha_celery.harness.launch import WorkerProcess, client_app, start_worker, wait_for, worker_env, write_worker_config

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["LocalNode", "Wait", "hostname", "local_node", "wait_answering"]

# How a start waits for its worker: Celery's "ready." line (logged at level info), the worker's record in the
# registry, an answered ping (any log level), or not at all.
Wait = Literal["ready", "registered", "ping", None]


class LocalNode:
    """The Redis at ``url`` and the workers started on it under ``workdir``; ``close`` stops the workers."""

    def __init__(self, url: str, workdir: Path, *, app: str = "hypha_celery", loglevel: str = "info",
                 args: Sequence[str] = (), env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 name: str = "local") -> None:
        self.url = url
        self.workdir = Path(workdir)
        self.app = app
        self.loglevel = loglevel
        self.args = tuple(args)
        self.env = dict(env or {})
        self.cwd = cwd
        self.name = name
        self.workers: list[WorkerProcess] = []
        self._client: Celery | None = None

    @property
    def client(self) -> Celery:
        """A client app of this node's Redis (built on first use, closed with the node): pings, test submissions."""
        if self._client is None:
            self._client = client_app(self.url, name=f"{self.name}-client")
        return self._client

    def start_worker(
        self,
        config: Mapping[str, Any] | Path | None = None,
        *,
        name: str | None = None,
        app: str | None = None,
        broker: str | None = None,
        backend: str | None = None,
        registry: str | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        loglevel: str | None = None,
        wait: Wait = "ready",
        timeout: float = 60,
    ) -> WorkerProcess:
        """Start one worker (``config``: a ``[worker]`` table, a TOML file, or none for a plain Celery app) and wait.

        ``broker``, ``backend`` and ``registry`` default to the node's Redis; ``env`` adds to the node's; ``args``
        follow the node's. ``wait``: see :data:`Wait`. A worker that exits before it is ready raises
        ``RuntimeError``, one that is not ready in ``timeout`` seconds ``TimeoutError`` (it keeps running:
        ``close`` stops it).
        """
        name = name or f"{self.name}-{len(self.workers)}-{uuid.uuid4().hex[:6]}"
        if config is not None and not isinstance(config, Path):
            config = write_worker_config(self.workdir / f"{name}.toml", config)
        environment = worker_env(broker or self.url, backend or self.url, registry or self.url,
                                 **{**self.env, **(env or {})})
        worker = start_worker(name, self.workdir / f"{name}.log", environment, app=app or self.app, config=config,
                              loglevel=loglevel or self.loglevel, args=[*self.args, *args], cwd=self.cwd)
        self.workers.append(worker)
        if wait == "ready":
            worker.wait_ready(timeout)
        elif wait == "registered":
            self.wait_registered(worker, timeout=timeout)
        elif wait == "ping":
            self.wait_answering(worker, timeout=timeout)
        return worker

    def wait_registered(self, worker: WorkerProcess, *, node_id: str | None = None,
                        timeout: float = 90) -> list[dict[str, Any]]:
        """``worker``'s live record in the registry (in a list; ``node_id``: only if it is on that node) once there;
        ``RuntimeError`` if ``worker`` exits first, ``TimeoutError`` after ``timeout`` seconds."""
        from hypha_celery.redis_client import registry_client
        from hypha_celery.registry import list_workers

        registry = worker.env.get("HYPHA_REGISTRY_URL", self.url)
        worker_id = hostname(worker)
        client = registry_client(registry)

        def registered() -> list[dict[str, Any]]:
            if not worker.alive():
                raise RuntimeError(f"worker {worker.name} exited with {worker.process.returncode}; see {worker.log}")
            return [record for record in list_workers(client) if record.get("worker_id") == worker_id
                    and (node_id is None or record.get("node_id") == node_id)]

        try:
            return wait_for(registered, timeout, f"worker {worker.name} to register", interval=0.3)
        finally:
            client.close()

    def wait_answering(self, worker: WorkerProcess, *, app: Celery | None = None, timeout: float = 60) -> None:
        """Until ``worker`` answers a ping sent with ``app`` (default: :attr:`client`), whatever it logs."""
        wait_answering(worker, app or self.client, timeout)

    def close(self) -> None:
        """Stop every worker started here (last first) and close the client app."""
        while self.workers:
            self.workers.pop().stop()
        if self._client is not None:
            self._client.close()
            self._client = None


def hostname(worker: WorkerProcess) -> str:
    """The worker's Celery node name (``-n NAME@%h``): its ping destination and its registry ``worker_id``."""
    return f"{worker.name}@{socket.gethostname()}"


def wait_answering(worker: WorkerProcess, app: Celery, timeout: float = 60) -> None:
    """Until ``worker`` answers a ping sent with ``app`` (at level warning it logs no ``ready.`` line);
    ``RuntimeError`` if it exits first, ``TimeoutError`` after ``timeout`` seconds."""
    destination = [hostname(worker)]
    worker.wait_ready(timeout, ready=lambda: bool(app.control.ping(destination=destination, timeout=0.5)))


@contextmanager
def local_node(
    workdir: Path,
    *,
    redis_url: str | None = None,
    config: Mapping[str, Any] | Path | None = None,
    workers: int = 1,
    wait: Wait = "ready",
    app: str = "hypha_celery",
    loglevel: str = "info",
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    name: str = "local",
) -> Iterator[LocalNode]:
    """A Redis (``redis_url``, else an embedded ``redis-server``) and ``workers`` workers of ``config``, waited for.

    ``workers=0`` starts none: the caller starts its own with :meth:`LocalNode.start_worker`. On the way out
    (an exception too) the workers are stopped, then the embedded Redis, if one was started.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if redis_url is None:
            from hypha_celery.harness.embedded_redis import EmbeddedRedis

            redis_url = stack.enter_context(EmbeddedRedis()).url
        node = LocalNode(redis_url, workdir, app=app, loglevel=loglevel, args=args, env=env, cwd=cwd, name=name)
        stack.callback(node.close)
        for index in range(workers):
            node.start_worker(config, name=name if workers == 1 else f"{name}-{index}", wait=wait)
        yield node
