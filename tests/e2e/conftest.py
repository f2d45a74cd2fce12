"""End-to-end tests: real Redis, real ``celery -A hypha_celery worker`` processes, real executors.

Every test here carries the ``slow`` marker; ``pytest -m 'not slow'`` (``make test-unit``) skips them.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.slow)
