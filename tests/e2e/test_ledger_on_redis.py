"""The ledger's contract (tests/unit/test_ledger.py) against a real redis-server, not fakeredis."""

from __future__ import annotations

import pytest
import redis

from tests.unit.test_ledger import (  # noqa: F401 - pytest collects the imported tests and uses the fixture
    ledger,
    test_a_duplicate_refusal_names_the_running_lease,
    test_a_gpu_cache_takes_memory_but_never_holds_the_device,
    test_a_lease_taken_back_over_commits_rather_than_move,
    test_a_lost_lease_is_taken_back_as_it_was,
    test_a_node_without_capacity_is_refused_as_unknown,
    test_a_refusal_says_why_and_which_resource,
    test_a_reservation_sent_twice_takes_once,
    test_a_task_id_runs_under_one_live_lease,
    test_an_expired_lease_returns_its_resources,
    test_cache_accounts_count_as_taken,
    test_gpu_best_fit_and_exclusive_devices,
    test_gpu_sharing_packs_tasks_by_memory,
    test_hold_without_a_keeper_renews_and_releases,
    test_infeasible_is_not_busy,
    test_lease_keeper_renews_in_the_background,
    test_leases_are_taken_back_into_a_ledger_that_restarted_empty,
    test_placement_indexes_track_free_resources,
    test_release_is_idempotent_and_returns_everything,
    test_renewal_keeps_a_lease_alive,
    test_reservation_takes_every_resource_or_none,
    test_two_half_core_tasks_are_not_packed_onto_one_core,
    test_whole_cores_are_held_alone_and_fractions_share_the_pool,
)


@pytest.fixture
def client(redis_client: redis.Redis) -> redis.Redis:
    """The same tests, on the session's real Redis (a clean database per test)."""
    return redis_client
