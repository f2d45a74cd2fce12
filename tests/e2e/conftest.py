"""End-to-end tests: real Redis, real ``celery -A hypha_celery worker`` processes, real executors, subprocesses.

Every test here carries the ``slow`` marker; ``pytest -m 'not slow'`` (or ``pytest tests/unit``) skips them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Called with the whole session's items, not only this folder's.
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def own_redis_url() -> Iterator[str]:
    """A redis-server of the module's own, for tests that read its server-wide counters (INFO) or change what is
    server-wide (SCRIPT FLUSH): not ``redis_url``, which CI shares between xdist processes (a database each)."""
    from hypha_celery.harness.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="module")
def own_redis(own_redis_url: str) -> Iterator[redis.Redis]:
    """A client of ``own_redis_url``."""
    client = redis.Redis.from_url(own_redis_url)
    yield client
    client.close()


def copy_store(model_dir: Path, target: Path) -> Path:
    """A writable copy of the session's example store (its lock files left behind) at ``target``."""
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns(".locks"))
    return target


@pytest.fixture
def store_dir(tmp_path: Path, model_dir: Path) -> Path:
    """The test's own copy of the example store, for workers that write to it."""
    return copy_store(model_dir, tmp_path / "store")
