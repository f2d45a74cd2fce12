"""The ledger contract, placement and the registry against a real 3-primary Redis Cluster.

The cluster is the session's :class:`~hypha_celery.harness.embedded_redis.EmbeddedCluster`;
every client is built by :func:`hypha_celery.redis_client.registry_client` from its
``?cluster=true`` URL, with ``HYPHA_KEY_PREFIX={hypha}`` (the ``cluster_client`` fixture).
The whole ledger contract of ``tests/unit/test_ledger.py`` runs here, and the placement
tests of ``tests/unit/test_placement.py`` that take a client.
"""

from __future__ import annotations

import time

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from hypha_celery import keys, registry
from hypha_celery.config import parse_config
from hypha_celery.resources.capabilities import detect_capabilities
from hypha_celery.resources.ledger import Capacity, Ledger
from hypha_celery.resources.placement import Placement
from hypha_celery.resources.requirements import Requirements
from tests.unit.test_ledger import (  # noqa: F401 - pytest collects the imported tests and uses the fixture
    ledger,
    test_a_duplicate_refusal_names_the_running_lease,
    test_a_gpu_cache_takes_memory_but_never_holds_the_device,
    test_a_lease_taken_back_over_commits_rather_than_move,
    test_a_lost_lease_is_taken_back_as_it_was,
    test_a_node_without_capacity_is_refused_as_unknown,
    test_a_refusal_says_why_and_which_resource,
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
from tests.unit.test_placement import (  # noqa: F401 - the same tests, on the cluster
    test_a_node_without_live_workers_is_skipped_and_dropped_only_once_unadvertised,
    test_best_fit_is_the_tightest_node,
    test_free_resources_follow_reservations,
    test_the_largest_node_is_described_for_an_infeasible_request,
)

GiB = 2**30


@pytest.fixture
def client(cluster_client: redis.Redis) -> redis.Redis:
    """The imported tests' client: the cluster, as a worker builds its client."""
    return cluster_client


def test_the_client_is_a_cluster_spread_over_three_primaries(cluster_client: redis.Redis) -> None:
    # Given the session's cluster, When its client is asked for its primaries
    primaries = cluster_client.get_primaries()  # type: ignore[attr-defined]
    # Then there are three, and the hypha keys all land in one slot on one of them
    assert len(primaries) == 3
    slots = {cluster_client.keyslot(key) for key in (  # type: ignore[attr-defined]
        keys.workers(), keys.node_used("a"), keys.index_free()["memory"], keys.task_guard("t"))}
    assert len(slots) == 1


def test_without_the_hash_tag_the_ledger_scripts_cannot_run(redis_cluster_url: str) -> None:
    # Given a RedisCluster built directly (not through registry_client) and the default prefix "hypha"
    client = RedisCluster.from_url(redis_cluster_url.replace("?cluster=true", ""))
    try:
        ledger = Ledger(client, "node-x", ttl=5, schema=keys.KeySchema("hypha"))  # type: ignore[arg-type]
        # When the ledger writes a capacity, Then the cluster refuses: its keys span slots
        with pytest.raises(RedisClusterException, match="same key slot"):
            ledger.set_capacity(Capacity(cores=[0], memory=GiB, gpus={}))
    finally:
        client.close()


def test_registry_records_are_written_listed_and_removed(cluster_client: redis.Redis) -> None:
    # Given two workers on one node, registered in MULTI/EXEC transactions on the cluster
    caps = detect_capabilities(parse_config({}), ["mlp"])
    node = Ledger(cluster_client, "node-a", ttl=60)
    node.set_capacity(Capacity(cores=[0, 1], memory=4 * GiB, gpus={}))
    for worker_id in ("celery@a1", "celery@a2"):
        record = registry.WorkerRecord(worker_id=worker_id, node_id="node-a", queue=keys.worker_queue(worker_id),
                                       max_memory_per_task=GiB, max_cpu_cores_per_task=1, gpu_sharing=False,
                                       verify_task_signatures=True, started_at=time.time())
        registry.register(cluster_client, record, caps, node.usage(), ttl=30)
    # When they are listed, Then both are there with the node's live usage from the ledger
    listed = registry.list_workers(cluster_client)
    assert [w["worker_id"] for w in listed] == ["celery@a1", "celery@a2"]
    assert listed[0]["free_memory"] == 4 * GiB and listed[0]["models"] == ["mlp"]
    # ... placement sends a fitting request to the node
    choice = Placement(cluster_client).choose(Requirements.parse({"memory": GiB}))
    assert choice is not None and choice.node == "node-a"
    # When both deregister, Then the node leaves placement with its last worker
    registry.deregister(cluster_client, "celery@a1", "node-a")
    assert cluster_client.zscore(keys.index_free()["memory"], "node-a") is not None
    registry.deregister(cluster_client, "celery@a2", "node-a")
    assert registry.list_workers(cluster_client) == []
    assert cluster_client.zscore(keys.index_free()["memory"], "node-a") is None
