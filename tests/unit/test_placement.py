"""Placement over the ledger's indexes (fakeredis runs the same Lua as Redis)."""

from __future__ import annotations

import time

import fakeredis
import pytest

from hypha_celery import keys
from hypha_celery.errors import RegistryUnavailable
from hypha_celery.resources.ledger import Capacity, Ledger
from hypha_celery.resources.placement import Placement
from hypha_celery.resources.requirements import Requirements

GiB = 2**30


def node(client: fakeredis.FakeRedis, name: str, capacity: Capacity, *, live: bool = True) -> Ledger:
    ledger = Ledger(client, name, ttl=60)
    ledger.set_capacity(capacity)
    if live:
        client.zadd(keys.node_workers(name), {f"w-{name}": time.time() + 60})
    return ledger


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_best_fit_is_the_tightest_node(client: fakeredis.FakeRedis) -> None:
    node(client, "big", Capacity(cores=list(range(8)), memory=64 * GiB))
    node(client, "small", Capacity(cores=list(range(8)), memory=8 * GiB))
    placement = Placement(client)
    assert placement.choose(Requirements(memory=4 * GiB)).node == "small"
    assert placement.choose(Requirements(memory=16 * GiB)).node == "big"
    assert placement.choose(Requirements(memory=4 * GiB), exclude="w-small").node == "big"
    assert placement.choose(Requirements(memory=128 * GiB)) is None


def test_free_resources_follow_reservations(client: fakeredis.FakeRedis) -> None:
    small = node(client, "small", Capacity(cores=[0, 1], memory=8 * GiB))
    node(client, "big", Capacity(cores=[0, 1], memory=64 * GiB))
    small.reserve(Requirements(memory=6 * GiB), holder="x")
    assert Placement(client).choose(Requirements(memory=4 * GiB)).node == "big"
    assert Placement(client).feasible(Requirements(memory=4 * GiB)).node == "small"


def test_a_whole_gpu_is_found_among_thousands_of_cpu_nodes(client: fakeredis.FakeRedis) -> None:
    for index in range(2100):
        node(client, f"cpu{index}", Capacity(cores=[0, 1], memory=8 * GiB))
    node(client, "gpu", Capacity(cores=[0, 1], memory=8 * GiB, gpus={0: 80 * 10**9}))
    placement = Placement(client)
    assert placement.choose(Requirements(gpus=1)).node == "gpu"
    assert placement.feasible(Requirements(gpus=1)).node == "gpu"
    assert placement.choose(Requirements(gpus=2)) is None


def test_a_node_without_live_workers_is_skipped_and_dropped_only_once_unadvertised(client: fakeredis.FakeRedis) -> None:
    node(client, "quiet", Capacity(cores=[0], memory=8 * GiB))
    client.zadd(keys.node_workers("quiet"), {"w-quiet": time.time() - 1})  # its worker's entry expired
    placement = Placement(client)
    assert placement.choose(Requirements(memory=GiB)) is None
    assert client.zscore(keys.index_capacity()["memory"], "quiet") is not None  # kept: it may come back
    client.delete(keys.node_workers("quiet"))  # nobody advertised it for 3 intervals
    assert placement.feasible(Requirements(memory=GiB)) is None
    assert client.zscore(keys.index_capacity()["memory"], "quiet") is None
    assert not Ledger(client, "quiet").indexed()  # what the worker's monitor checks to put it back


def test_the_largest_node_is_described_for_an_infeasible_request(client: fakeredis.FakeRedis) -> None:
    # Given two nodes of different sizes
    node(client, "small", Capacity(cores=[0, 1], memory=8 * GiB))
    node(client, "big", Capacity(cores=list(range(8)), memory=64 * GiB, gpus={0: 80 * GiB}))
    # When no node can fit a request, Then the error names the largest capacity of each kind
    error = Placement(client).infeasible(Requirements(memory=128 * GiB))
    assert "the largest seen has memory 64" in str(error) and "cores 8" in str(error) and "gpus 1" in str(error)


def test_a_redis_outage_is_registry_unavailable() -> None:
    # Given placement over a Redis that is down
    server = fakeredis.FakeServer()
    server.connected = False
    placement = Placement(fakeredis.FakeRedis(server=server))
    # When it chooses or describes the largest node, Then it raises RegistryUnavailable, never redis-py's error
    with pytest.raises(RegistryUnavailable, match="registry Redis unreachable"):
        placement.choose(Requirements(memory=GiB))
    with pytest.raises(RegistryUnavailable):
        placement.largest()
