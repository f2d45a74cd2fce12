"""Placement against a real redis-server: the unit tests' contract, and the early answer for a request nothing fits.

``place.lua`` answers "nothing fits" before walking when some index's best score is below the
request's floor; here that answer is checked against the full walk (the script without that line)
over random nodes and requests, and counted in Redis' own ``INFO commandstats`` on a server of this
module's own (the counters are server-wide; the session's Redis may be shared in CI).
"""

from __future__ import annotations

import hashlib
import random
import time

import pytest
import redis

from hypha_celery import keys, lua
from hypha_celery.resources.ledger import Capacity, Ledger
from hypha_celery.resources.placement import SCAN_LIMIT, Placement
from hypha_celery.resources.requirements import Requirements
from tests.unit.test_placement import (  # noqa: F401 - pytest collects the imported tests and uses the fixture
    test_a_node_without_live_workers_is_skipped_and_dropped_only_once_unadvertised,
    test_best_fit_is_the_tightest_node,
    test_free_resources_follow_reservations,
    test_the_largest_node_is_described_for_an_infeasible_request,
)

GiB = 2**30
EARLY_ANSWER = "if not meets(top) then return {} end\n"


@pytest.fixture
def client(redis_client: redis.Redis) -> redis.Redis:
    """The unit tests' client: the session's real Redis, a clean database per test."""
    return redis_client



def add_nodes(client: redis.Redis, capacities: list[Capacity]) -> list[Ledger]:
    """One live worker per node; nodes ``n0000``, ``n0001``, ... written in one pipeline."""
    Ledger(client, "warm-up").set_capacity(Capacity(cores=[0], memory=GiB))  # loads the script for the pipeline
    client.flushdb()
    expires = time.time() + 600
    with client.pipeline(transaction=False) as pipe:
        for index, capacity in enumerate(capacities):
            Ledger(pipe, f"n{index:04d}").set_capacity(capacity)
            pipe.zadd(keys.node_workers(f"n{index:04d}"), {f"w{index:04d}": expires})
        pipe.execute()
    return [Ledger(client, f"n{index:04d}", ttl=600) for index in range(len(capacities))]


def calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_request_no_node_fits_is_answered_without_walking(own_redis: redis.Redis) -> None:
    # Given more nodes than placement walks, each with 4 free cores and plenty of memory
    add_nodes(own_redis, [Capacity(cores=list(range(4)), memory=16 * GiB) for _ in range(SCAN_LIMIT + 500)])
    placement = Placement(own_redis)
    # When a task asks for 8 cores (memory, the index walked first, fits every node)
    before = calls(own_redis, "zscore")
    busy, never = placement.choose(Requirements(cpu_milli=8000)), placement.feasible(Requirements(cpu_milli=8000))
    # Then nothing fits now or ever, and no node was looked at one by one
    assert busy is None and never is None
    assert calls(own_redis, "zscore") - before == 0
    # ... while a request that fits is still found, by looking at nodes
    assert placement.choose(Requirements(cpu_milli=4000)) is not None
    assert calls(own_redis, "zscore") - before > 0


def test_the_early_answer_is_the_full_walks_answer(client: redis.Redis) -> None:
    # Given random nodes (some with GPUs, some partly busy) and the walk without the early answer
    rng = random.Random(3)
    ledgers = add_nodes(client, [
        Capacity(cores=list(range(rng.choice([2, 4, 8, 16]))), memory=rng.choice([8, 16, 64]) * GiB,
                 gpus={g: rng.choice([16, 24, 80]) * 10**9 for g in range(rng.choice([0, 0, 1, 2, 4]))},
                 gpu_sharing=rng.random() < 0.3)
        for _ in range(300)
    ])
    for ledger in ledgers:
        if rng.random() < 0.5:
            ledger.try_reserve(Requirements(cpu_milli=rng.choice([500, 2000]), memory=rng.choice([1, 6]) * GiB,
                                            gpus=rng.choice([0, 1]), gpu_memory=rng.choice([0, 10 * 10**9])),
                               holder="busy")
    source = lua.source("place")
    assert EARLY_ANSWER in source, "place.lua no longer has the early answer this test compares"
    walk_only = source.replace(EARLY_ANSWER, "")
    walk = lua.Script(name="place-walk-only", text=walk_only,
                      sha=hashlib.sha1(walk_only.encode(), usedforsecurity=False).hexdigest())
    schema = keys.KeySchema.from_env()
    placement = Placement(client)
    answers = {"found": 0, "none": 0}
    # When random requests, feasible and not, are placed both ways, now and by capacity
    for _ in range(300):
        req = Requirements(cpu_milli=rng.choice([0, 250, 1000, 4000, 12000, 32000]),
                           memory=rng.choice([0, 1, 8, 60, 100]) * GiB, gpus=rng.choice([0, 0, 1, 2, 3, 8]),
                           gpu_memory=rng.choice([0, 20 * 10**9, 70 * 10**9, 100 * 10**9]))
        for mode in ("free", "capacity"):
            args = [mode, req.memory, req.cpu_milli, req.gpus, req.gpu_memory, "", SCAN_LIMIT,
                    *schema.node_workers_affixes()]
            full = walk(client, list(schema.placement().values()), args)
            fast = placement.choose(req) if mode == "free" else placement.feasible(req)
            # Then both give the same node, or both give none
            expected = None if not full else full[0].decode()
            assert (fast.node if fast else None) == expected, f"{mode} {req}"
            answers["found" if fast else "none"] += 1
    assert answers["found"] > 50 and answers["none"] > 50, answers  # both kinds of answer were compared
