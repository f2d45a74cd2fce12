"""End-to-end tests: real Redis, real ``celery -A hypha_celery worker`` processes, real executors, subprocesses.

Every test here carries the ``slow`` marker; ``pytest -m 'not slow'`` (or ``pytest tests/unit``) skips them.
"""

from __future__ import annotations

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
def own_redis() -> Iterator[redis.Redis]:
    """A redis-server of the module's own, for tests that read its server-wide counters (INFO): not ``redis_url``,
    which CI may share."""
    from hypha_celery.tools.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        yield client
        client.close()
