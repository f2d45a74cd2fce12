"""How the suite runs in parallel (tests/conftest.py): a Redis database per xdist process, and what runs together."""

from __future__ import annotations

import pytest

from tests.conftest import database_url, work_unit


def test_each_process_gets_the_urls_database_or_one_below_it() -> None:
    # Given CI's URL, database 15; When processes gw0 and gw3 take theirs
    first, fourth = database_url("redis://127.0.0.1:6379/15", "gw0"), database_url("redis://127.0.0.1:6379/15", "gw3")
    # Then the first keeps 15 and the fourth has 12, and the rest of the URL is kept
    assert (first, fourth) == ("redis://127.0.0.1:6379/15", "redis://127.0.0.1:6379/12")
    assert database_url("redis://:pw@h:6379/15?protocol=3", "gw1") == "redis://:pw@h:6379/14?protocol=3"


def test_more_processes_than_databases_below_the_url_are_refused_naming_how_many_fit() -> None:
    # Given a URL naming database 1 (two databases at or below it), When a third process asks for one
    with pytest.raises(ValueError, match=r"PYTEST_WORKERS=2 or less"):
        database_url("redis://127.0.0.1:6379/1", "gw2")


@pytest.mark.parametrize(("nodeid", "unit"), [
    ("tests/e2e/test_rabbitmq_quorum_e2e.py::test_tasks_run_over_rabbitmq_with_a_quorum_shared_queue", "rabbitmq"),
    ("tests/e2e/test_worker_e2e.py::test_infer_over_rabbitmq", "rabbitmq"),
    ("tests/e2e/test_packaging.py::test_a_scheduler_module_imports_on_a_base_install[hypha_celery.client]", "packaging"),
    ("tests/unit/test_ledger.py::test_fit_logic_matches_the_spec", "tests/unit/test_ledger.py"),
    ("tests/e2e/test_models_import.py::test_an_import_writes_the_stamp_of_what_it_hashed", "tests/e2e/test_models_import.py"),
    ("tests/e2e/test_worker_e2e.py::test_noop", "tests/e2e/test_worker_e2e.py::test_noop"),
])
def test_a_test_runs_in_its_group_its_whole_module_or_alone(nodeid: str, unit: str) -> None:
    # When the scheduler asks what a test runs with, Then: RabbitMQ's and packaging's tests each in one group, a unit
    # module whole, any other e2e test on its own
    assert work_unit(nodeid) == unit
