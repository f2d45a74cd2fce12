"""Unit tests start no process: a test here that asks for a real Redis, broker or worker is a collection error."""

from __future__ import annotations

import pytest

_PROCESS_FIXTURES = frozenset({
    "redis_url", "redis_client", "redis_cluster_url", "cluster_client", "amqp_url", "start_worker", "celery_client",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/unit/" not in str(item.path):
            continue
        wanted = _PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
        if wanted:
            raise pytest.UsageError(f"{item.nodeid} is a unit test but uses {sorted(wanted)}: move it to tests/e2e")
