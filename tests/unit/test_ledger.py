"""The node ledger: atomic all-or-nothing leases, on fakeredis (the same Lua as Redis).

``tests/e2e/test_ledger_on_redis.py`` runs this same contract against a real redis-server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypha_celery import keys
from hypha_celery.errors import (
    ControlFlow,
    DuplicateTask,
    InsufficientCapabilities,
    InsufficientGpuMemory,
    RegistryUnavailable,
    ResourcesBusy,
)
from hypha_celery.executor.process import ExecutorSettings
from hypha_celery.executor.requests import job_limits
from hypha_celery.harness.launch import wait_for
from hypha_celery.resources.ledger import Call, Capacity, Lease, LeaseKeeper, Ledger, Refusal
from hypha_celery.resources.requirements import Requirements

MiB = 2**20


def req(**fields: object) -> Requirements:
    """Requirements as a task writes them; memory defaults to 1 MiB here to keep the arithmetic visible."""
    return Requirements.parse({"memory": MiB, **fields})


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    """fakeredis runs the scripts with lupa; the e2e twin of this file overrides this fixture with a real Redis."""
    fake = fakeredis.FakeRedis()
    yield fake
    fake.flushall()


@pytest.fixture
def ledger(client: redis.Redis) -> Ledger:
    ledger = Ledger(client, "node-a", ttl=5)
    ledger.set_capacity(Capacity(cores=[0, 1, 2, 3], memory=1000 * MiB, gpus={0: 80_000, 1: 40_000}))
    return ledger


def test_reservation_takes_every_resource_or_none(ledger: Ledger) -> None:
    # Given a GPU held whole and another held by memory
    ledger.reserve(req(gpus=1), holder="a")
    ledger.reserve(req(gpus=1), holder="b")
    before = ledger.usage()
    # When a request fits in memory and cores but not in GPUs
    with pytest.raises(ResourcesBusy, match="gpu"):
        ledger.reserve(req(memory=100 * MiB, cpu_cores=1, gpus=1), holder="c")
    # Then nothing was taken
    after = ledger.usage()
    assert (after.memory_used, after.core_milli_used, after.gpu_memory_used) == (
        before.memory_used, before.core_milli_used, before.gpu_memory_used)


def test_whole_cores_are_held_alone_and_fractions_share_the_pool(ledger: Ledger) -> None:
    # Given two whole cores held alone on a 4-core node
    two = ledger.reserve(req(cpu_cores=2), holder="a")
    assert two.cores == {0: 1000, 1: 1000} and two.cpu_shared == 0
    # When fractions arrive, Then each may run on every core of the shared pool (the cores nobody holds alone)
    quarter = ledger.reserve(req(cpu_cores=0.25), holder="b")
    half = ledger.reserve(req(cpu_cores=0.5), holder="c")
    assert quarter.core_ids == half.core_ids == [2, 3]
    assert (quarter.cpu_shared, sum(quarter.cores.values()), half.cpu_shared) == (250, 250, 500)
    # ... a whole core may leave the pool while the core left still covers the 0.75 running in it
    assert ledger.reserve(req(cpu_cores=1), holder="d").cores == {2: 1000}
    with pytest.raises(ResourcesBusy, match="cpu"):
        ledger.reserve(req(cpu_cores=1), holder="e")
    # ... and the last quarter of the pool goes to a fraction, pinned to the one core left in it
    assert ledger.reserve(req(cpu_cores=0.25), holder="f").core_ids == [3]
    with pytest.raises(ResourcesBusy, match="cpu"):
        ledger.reserve(req(cpu_cores=0.001), holder="g")
    usage = ledger.usage()
    assert usage.core_milli_used == {0: 1000, 1: 1000, 2: 1000} and usage.shared_milli_used == 1000
    assert usage.cores_used == 4


def test_two_half_core_tasks_are_not_packed_onto_one_core(client: redis.Redis) -> None:
    # Given an idle 2-core node
    ledger = Ledger(client, "two-cores", ttl=5)
    ledger.set_capacity(Capacity(cores=[0, 1], memory=1000 * MiB))
    # When two 0.5-core tasks are admitted
    a = ledger.reserve(req(cpu_cores=0.5), holder="a")
    b = ledger.reserve(req(cpu_cores=0.5), holder="b")
    # Then both may run on both cores (the kernel spreads them), not both on core 0
    assert a.core_ids == b.core_ids == [0, 1]
    # ... and they still count as one core of the two: one whole core is left to hold alone
    assert ledger.reserve(req(cpu_cores=1), holder="c").cores == {0: 1000}
    assert ledger.try_reserve(req(cpu_cores=0.001), holder="d") == Refusal(why="busy", resource="cpu")


def test_a_fractions_job_may_run_on_its_whole_pool_with_one_thread(client: redis.Redis) -> None:
    # Given a 0.5-core lease and a 2-core lease on an idle 4-core node
    ledger = Ledger(client, "pins", ttl=5)
    ledger.set_capacity(Capacity(cores=[0, 1, 2, 3], memory=1000 * MiB))
    half = ledger.reserve(req(cpu_cores=0.5), holder="a")
    two = ledger.reserve(req(cpu_cores=2), holder="b")
    settings = ExecutorSettings(store="/nowhere", cache_size=0, max_model_size=0, sandbox=False, nice=0,
                                enforce_memory=False, enforce_cpu=True)
    # Then the executor pins the fraction's job to the pool it was admitted to, with one torch thread
    assert (job_limits([half], settings).cores, job_limits([half], settings).threads) == ([0, 1, 2, 3], 1)
    # ... and the whole-core job to its own cores, one thread each
    assert (job_limits([two], settings).cores, job_limits([two], settings).threads) == ([0, 1], 2)


def test_gpu_best_fit_and_exclusive_devices(ledger: Ledger) -> None:
    # Given devices of 80 GB and 40 GB, When a task needs 30 GB, Then it gets the smaller (best fit)
    small = ledger.reserve(req(gpus=1, gpu_memory=30_000), holder="a")
    assert small.gpus == {1: 30_000} and small.exclusive_gpu
    assert small.device == "cuda:0" and small.cuda_visible_devices == "1"
    # Without sharing, the held device is not offered again even though 10 GB are free on it
    other = ledger.reserve(req(gpus=1, gpu_memory=5_000), holder="b")
    assert other.gpu_ids == [0]
    with pytest.raises(ResourcesBusy, match="gpu"):
        ledger.reserve(req(gpus=1, gpu_memory=1_000), holder="c")


def test_gpu_sharing_packs_tasks_by_memory(client: redis.Redis) -> None:
    ledger = Ledger(client, "shared", ttl=5)
    ledger.set_capacity(Capacity(cores=[0, 1], memory=1000 * MiB, gpus={0: 80_000}, gpu_sharing=True))
    a = ledger.reserve(req(cpu_cores=0.1, gpu_memory=50_000), holder="a")
    b = ledger.reserve(req(cpu_cores=0.1, gpu_memory=30_000), holder="b")
    assert a.gpu_ids == b.gpu_ids == [0] and not a.exclusive_gpu
    with pytest.raises(ResourcesBusy):
        ledger.reserve(req(cpu_cores=0.1, gpu_memory=1), holder="c")
    # a whole-device request waits for the device to be empty, then holds it alone
    ledger.release(a, b)
    whole = ledger.reserve(req(cpu_cores=0.1, gpus=1), holder="d")
    assert whole.exclusive_gpu and whole.gpus == {0: 80_000}
    with pytest.raises(ResourcesBusy):
        ledger.reserve(req(cpu_cores=0.1, gpu_memory=1), holder="e")


def test_infeasible_is_not_busy(ledger: Ledger) -> None:
    with pytest.raises(InsufficientCapabilities, match="can never fit"):
        ledger.reserve(req(memory=2000 * MiB), holder="a")
    with pytest.raises(InsufficientGpuMemory):
        ledger.reserve(req(gpus=3), holder="a")
    with pytest.raises(InsufficientGpuMemory):
        ledger.reserve(req(gpus=1, gpu_memory=100_000), holder="a")


def test_release_is_idempotent_and_returns_everything(ledger: Ledger) -> None:
    lease = ledger.reserve(req(memory=300 * MiB, cpu_cores=1, gpus=1), holder="a")
    assert ledger.release(lease) == 1
    assert ledger.release(lease) == 0
    usage = ledger.usage()
    assert usage.memory_used == 0 and not usage.core_milli_used and not usage.gpu_memory_used and not usage.leases


def test_an_expired_lease_returns_its_resources(client: redis.Redis) -> None:
    # Given a lease whose holder stopped renewing (killed -9)
    ledger = Ledger(client, "node-b", ttl=0.3)
    ledger.set_capacity(Capacity(cores=[0], memory=100 * MiB))
    lease = ledger.reserve(req(memory=100 * MiB), holder="dead")
    with pytest.raises(ResourcesBusy):
        ledger.reserve(req(memory=1 * MiB), holder="x")
    # When its TTL passes, Then its resources are free again and a late renewal reports it lost
    time.sleep(0.4)
    assert ledger.reserve(req(memory=100 * MiB), holder="alive")
    assert ledger.renew([lease]) == {lease.id}


def test_renewal_keeps_a_lease_alive(client: redis.Redis) -> None:
    ledger = Ledger(client, "node-c", ttl=0.4)
    ledger.set_capacity(Capacity(cores=[0], memory=100 * MiB))
    lease = ledger.reserve(req(memory=100 * MiB), holder="a")
    for _ in range(4):
        time.sleep(0.2)
        assert ledger.renew([lease]) == set()
    assert [entry["id"] for entry in ledger.usage().leases] == [lease.id]


def test_lease_keeper_renews_in_the_background(client: redis.Redis) -> None:
    ledger = Ledger(client, "node-k", ttl=0.4)
    ledger.set_capacity(Capacity(cores=[0], memory=100 * MiB))
    keeper = LeaseKeeper(ledger, interval=0.1)
    with ledger.hold(req(memory=50 * MiB), holder="a", keeper=keeper) as lease:
        time.sleep(1.0)
        assert not keeper.lost(lease)
        assert ledger.usage().memory_used == 50 * MiB
    assert ledger.usage().memory_used == 0


def test_hold_without_a_keeper_renews_and_releases(client: redis.Redis) -> None:
    # Given a short TTL and no keeper of the caller's
    ledger = Ledger(client, "node-h", ttl=0.4)
    ledger.set_capacity(Capacity(cores=[0], memory=100 * MiB))
    # When a lease is held for longer than its TTL
    with ledger.hold(req(memory=50 * MiB), holder="a") as lease:
        time.sleep(1.0)
        # Then it is still held (renewed by a keeper of its own)
        assert [entry["id"] for entry in ledger.usage().leases] == [lease.id]
    # ... and given back when the block ends
    assert ledger.usage().leases == []


def test_a_refusal_says_why_and_which_resource(ledger: Ledger) -> None:
    # Given the node's memory all taken
    ledger.reserve(req(memory=1000 * MiB), holder="a")
    # When more is asked, Then the refusal is typed: busy, on memory
    assert ledger.try_reserve(req(memory=MiB), holder="b") == Refusal(why="busy", resource="memory")
    # ... and asking more than the node has is infeasible, not busy
    assert ledger.try_reserve(req(memory=2000 * MiB), holder="b") == Refusal(why="infeasible", resource="memory")


def test_a_duplicate_refusal_names_the_running_lease(ledger: Ledger) -> None:
    # Given a task running under a lease
    first = ledger.reserve(req(), holder="w1", task_id="t-dup")
    # When a copy of it asks
    refusal = ledger.try_reserve(req(), holder="w2", task_id="t-dup")
    # Then the refusal names the lease and its holder, and explains itself as a control-flow DuplicateTask
    assert refusal == Refusal(why="duplicate", lease=first.id, holder="w1")
    assert isinstance(refusal, Refusal)
    error = ledger.refusal(req(), refusal, "t-dup")
    assert isinstance(error, DuplicateTask) and isinstance(error, ControlFlow)


def test_a_reservation_sent_twice_takes_once(ledger: Ledger) -> None:
    # Given a transport that delivers the reservation script twice (its first reply lost with a dropped connection)
    def twice(call: Call) -> object:
        call.script(ledger.redis, call.keys, call.args)
        return call.script(ledger.redis, call.keys, call.args)

    # When a task reserves through it
    lease = ledger.try_reserve(req(memory=100 * MiB, cpu_cores=1, gpus=1), holder="w", task_id="t-twice", via=twice)
    # Then the second delivery answers with the lease the first took: granted once, counted once
    assert isinstance(lease, Lease) and lease.memory == 100 * MiB and len(lease.cores) == 1 and len(lease.gpus) == 1
    usage = ledger.usage()
    assert usage.memory_used == 100 * MiB and sum(usage.core_milli_used.values()) == 1000
    assert [held["id"] for held in usage.leases] == [lease.id]
    # ... and it is released as one lease
    assert ledger.release(lease) == 1 and ledger.usage().memory_used == 0


def test_a_node_without_capacity_is_refused_as_unknown(client: redis.Redis) -> None:
    # Given a node that never published its capacity (e.g. Redis restarted empty)
    ledger = Ledger(client, "node-new", ttl=5)
    # When a task asks, Then the refusal says so, and it reads as busy (the monitor publishes it again)
    refusal = ledger.try_reserve(req(), holder="a")
    assert refusal == Refusal(why="unknown_node")
    assert isinstance(ledger.refusal(req(), refusal), ResourcesBusy)


def test_a_redis_outage_is_registry_unavailable() -> None:
    # Given a ledger whose Redis is down
    server = fakeredis.FakeServer()
    server.connected = False
    ledger = Ledger(fakeredis.FakeRedis(server=server), "node-down", ttl=5)
    # When it is asked anything, Then it raises hypha's RegistryUnavailable, not redis-py's error
    with pytest.raises(RegistryUnavailable, match="ledger Redis unreachable"):
        ledger.try_reserve(req(), holder="a")
    with pytest.raises(RegistryUnavailable):
        ledger.capacity()


def test_a_task_id_runs_under_one_live_lease(client: redis.Redis, ledger: Ledger) -> None:
    first = ledger.reserve(req(memory=10 * MiB), holder="w1", task_id="t-1")
    with pytest.raises(DuplicateTask) as caught:
        ledger.reserve(req(memory=10 * MiB), holder="w2", task_id="t-1")
    assert caught.value.lease_id == first.id and caught.value.holder == "w1"
    # ... on another node too (a redelivered copy may land anywhere)
    other = Ledger(client, "node-z", ttl=5)
    other.set_capacity(Capacity(cores=[0], memory=100 * MiB))
    with pytest.raises(DuplicateTask):
        other.reserve(req(memory=10 * MiB), holder="w3", task_id="t-1")
    # ... and right after it finished, a copy is still refused ("done"), so it cannot run again
    ledger.release(first)
    with pytest.raises(DuplicateTask) as done:
        other.reserve(req(memory=10 * MiB), holder="w3", task_id="t-1")
    assert done.value.lease_id == "done"
    # a lease that died with its holder frees the task id with it
    short = Ledger(client, "node-y", ttl=0.3)
    short.set_capacity(Capacity(cores=[0], memory=100 * MiB))
    short.reserve(req(memory=10 * MiB), holder="dead", task_id="t-2")
    time.sleep(0.4)
    assert other.reserve(req(memory=10 * MiB), holder="w3", task_id="t-2")


def test_cache_accounts_count_as_taken(ledger: Ledger) -> None:
    ledger.account("cache:x", memory=900 * MiB, holder="cache")
    with pytest.raises(ResourcesBusy):
        ledger.reserve(req(memory=200 * MiB), holder="a")
    ledger.account("cache:x", memory=0)
    assert ledger.reserve(req(memory=200 * MiB), holder="a")


def test_a_gpu_cache_takes_memory_but_never_holds_the_device(client: redis.Redis, ledger: Ledger) -> None:
    # Given the serving executor's cache keeps 30 GB on GPU 1 (40 GB)
    ledger.account("cache:gpu1", gpus={1: 30_000}, holder="cache")
    # Then a whole-device task still gets GPU 1 (the device less the cache), and nothing else fits beside it
    whole = ledger.reserve(req(gpus=1), holder="a")
    other = ledger.reserve(req(gpus=1), holder="b")
    assert {whole.gpu_ids[0], other.gpu_ids[0]} == {0, 1}
    on_one = whole if whole.gpu_ids == [1] else other
    assert on_one.gpus == {1: 10_000}
    assert ledger.usage().gpu_memory_used[1] == 40_000
    assert client.zscore(keys.index_free()["gpus"], "node-a") == 0


def test_placement_indexes_track_free_resources(client: redis.Redis, ledger: Ledger) -> None:
    lease = ledger.reserve(req(memory=250 * MiB, cpu_cores=2, gpus=1, gpu_memory=10_000), holder="a")
    score = {name: client.zscore(key, "node-a") for name, key in keys.index_free().items()}
    assert score == {"memory": 750 * MiB, "core_milli": 2000, "whole_cores": 2, "gpus": 1, "gpu_memory": 80_000}
    ledger.release(lease)
    assert client.zscore(keys.index_free()["memory"], "node-a") == 1000 * MiB
    assert client.zscore(keys.index_free()["gpus"], "node-a") == 2


# --- leases lost in a ledger outage are taken back -----------------------------------------------------

def _outlive(ledger: Ledger, *leases: Lease) -> None:
    """Let ``leases`` expire unrenewed, as in a ledger outage longer than the TTL, and see them reaped."""
    time.sleep(ledger.ttl + 0.1)
    gone = {lease.id for lease in leases}
    assert not gone & {entry["id"] for entry in ledger.usage().leases}


def test_a_lost_lease_is_taken_back_as_it_was(client: redis.Redis) -> None:
    # Given a node whose leases - whole cores, a fraction, a GPU with a task id, a model cache - were reaped
    ledger = Ledger(client, "node-r", ttl=0.3)
    ledger.set_capacity(Capacity(cores=[0, 1, 2], memory=1000 * MiB, gpus={0: 80_000}))
    whole = ledger.reserve(req(memory=100 * MiB, cpu_cores=1), holder="w/t-1", task_id="t-1")
    fraction = ledger.reserve(req(memory=100 * MiB, cpu_cores=0.5), holder="w/t-2")
    gpu = ledger.reserve(req(cpu_cores=0.25, gpus=1), holder="w/t-3", task_id="t-3")
    cache = Lease(id="cache:node-r:1:cpu", node="node-r", memory=300 * MiB, cores={}, gpus={}, exclusive_gpu=False,
                  holder="model cache on cpu", cache=True)
    ledger.account(cache.id, memory=cache.memory, holder=cache.holder)
    before = ledger.usage()
    _outlive(ledger, whole, fraction, gpu, cache)
    assert ledger.usage().memory_used == 0
    # When their holder, still running, takes them back
    retaken = ledger.retake([whole, fraction, gpu, cache], ttl=5)
    # Then each is back under its own id, nothing over-committed, and the ledger counts what it counted before
    assert retaken == {whole.id: [], fraction.id: [], gpu.id: [], cache.id: []}
    after = ledger.usage()
    assert (after.memory_used, after.core_milli_used, after.shared_milli_used, after.gpu_memory_used,
            after.gpu_holders) == (before.memory_used, before.core_milli_used, before.shared_milli_used,
                                   before.gpu_memory_used, before.gpu_holders)
    leases = {entry["id"]: entry for entry in after.leases}
    assert leases[whole.id]["c"] == [0, 1000] and leases[fraction.id]["a"] == [1, 2]
    assert leases[cache.id]["k"] == "cache" and leases[gpu.id]["t"] == "t-3"
    # ... so the cores stay pinned as they were: a whole core is left in the pool, the exclusive one is not offered
    assert ledger.reserve(req(cpu_cores=1), holder="x").cores == {1: 1000}
    # ... and the task ids are guarded again: a copy of t-1 is refused
    with pytest.raises(DuplicateTask):
        ledger.reserve(req(), holder="copy", task_id="t-1")
    # ... and a live lease is only renewed
    assert ledger.retake([whole]) == {}
    # ... and releasing them gives everything back
    ledger.release(whole, fraction, gpu)
    ledger.account(cache.id, memory=0)
    assert {entry["h"] for entry in ledger.usage().leases} == {"x"}


def test_a_lease_taken_back_over_commits_rather_than_move(client: redis.Redis) -> None:
    # Given a task holding core 0 and 600 MiB whose lease was reaped, and another task admitted meanwhile on the same
    ledger = Ledger(client, "node-o", ttl=0.3)
    ledger.set_capacity(Capacity(cores=[0, 1], memory=1000 * MiB))
    first = ledger.reserve(req(memory=600 * MiB, cpu_cores=1), holder="a")
    _outlive(ledger, first)
    second = ledger.reserve(req(memory=600 * MiB, cpu_cores=1), holder="b")
    assert second.cores == first.cores == {0: 1000}
    # When the first holder (its threads still pinned to core 0) takes its lease back
    retaken = ledger.retake([first], ttl=5)
    # Then it comes back on core 0 as it runs, and the ledger says the node is over-committed
    assert retaken == {first.id: ["memory", "core 0"]}
    usage = ledger.usage()
    assert usage.core_milli_used == {0: 2000} and usage.memory_used == 1200 * MiB
    # ... so nothing more is admitted until usage drops below capacity again
    assert ledger.try_reserve(req(memory=MiB, cpu_cores=0.1), holder="c") == Refusal(why="busy", resource="memory")
    ledger.release(second)
    assert ledger.reserve(req(memory=MiB, cpu_cores=1), holder="c").cores == {1: 1000}


def test_leases_are_taken_back_into_a_ledger_that_restarted_empty(client: redis.Redis) -> None:
    # Given a running task's lease, and the ledger's Redis restarted empty (no capacity, no leases)
    ledger = Ledger(client, "node-e", ttl=5)
    capacity = Capacity(cores=[0, 1], memory=1000 * MiB)
    ledger.set_capacity(capacity)
    lease = ledger.reserve(req(memory=600 * MiB, cpu_cores=1), holder="a", task_id="t-e")
    client.flushdb()  # the test's database alone: on a real Redis (tests/e2e) other processes' share the server
    # When the holder takes it back before the worker's monitor publishes the capacity again
    assert ledger.retake([lease]) == {lease.id: []}
    ledger.set_capacity(capacity)
    # Then the republished node counts it: a second 600 MiB task waits
    assert ledger.usage().memory_used == 600 * MiB
    assert ledger.try_reserve(req(memory=600 * MiB), holder="b") == Refusal(why="busy", resource="memory")


def test_the_keeper_takes_leases_back_after_an_outage_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    # Given a keeper renewing a one-core lease on a 2-core node every 0.1 s (TTL 0.4 s)
    server = fakeredis.FakeServer()
    ledger = Ledger(fakeredis.FakeRedis(server=server), "node-k2", ttl=0.4)
    ledger.set_capacity(Capacity(cores=[0, 1], memory=100 * MiB))
    keeper = LeaseKeeper(ledger, interval=0.1)
    lease = ledger.reserve(req(cpu_cores=1), holder="a", task_id="t-k")
    keeper.add(lease)
    # When the ledger's Redis is unreachable for longer than 2 x the TTL
    server.connected = False
    time.sleep(1.0)
    server.connected = True
    # Then the lease is held again under its id, on its core, while its holder runs
    wait_for(lambda: [entry["id"] for entry in ledger.usage().leases] == [lease.id], 5, "the lease taken back")
    assert ledger.usage().core_milli_used == {0: 1000}
    # ... so a second one-core task fits beside it, and a third does not
    assert ledger.reserve(req(cpu_cores=1), holder="b").cores == {1: 1000}
    assert ledger.try_reserve(req(cpu_cores=1), holder="c") == Refusal(why="busy", resource="cpu")
    # ... and the outage and the take-back were each logged once, not at every heartbeat after
    time.sleep(0.5)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("took back" in m for m in messages) == 1
    assert sum("unreachable" in m for m in messages) == 1
    assert not keeper.lost(lease)
    keeper.release(lease)
    keeper.flush()


# --- property tests of the fit logic, against an oracle written from the spec -------------------------

@st.composite
def node_and_ops(draw: st.DrawFn) -> tuple[Capacity, list[tuple[str, object]]]:
    cores = list(range(draw(st.integers(1, 4))))
    gpus = {i: draw(st.sampled_from([10, 40, 80])) for i in range(draw(st.integers(0, 3)))}
    capacity = Capacity(cores=cores, memory=draw(st.integers(100, 1000)), gpus=gpus, gpu_sharing=draw(st.booleans()))
    requests = st.builds(
        Requirements,
        cpu_milli=st.one_of(st.integers(1, 999), st.integers(1, 3).map(lambda c: c * 1000)),
        memory=st.integers(1, 400),
        gpus=st.integers(0, 2),
        gpu_memory=st.sampled_from([0, 5, 20, 50]),
    )
    ops = draw(st.lists(st.one_of(st.tuples(st.just("reserve"), requests), st.tuples(st.just("release"), st.integers(0, 50))),
                        max_size=25))
    return capacity, ops


def _fits(cap: Capacity, held: list[Lease], r: Requirements) -> bool:
    """The spec: enough memory, cores by whole or by fraction, and GPU devices by the sharing rule."""
    mem = sum(lease.memory for lease in held)
    if mem + r.memory > cap.memory:
        return False
    # CPU as Kubernetes' static CPU manager: whole cores alone, fractions from the pool of the rest
    alone = {c for lease in held if not lease.cpu_shared for c in lease.cores}
    pool = len(cap.cores) - len(alone)
    shared = sum(lease.cpu_shared for lease in held)
    if r.cpu_milli >= 1000:
        if (pool - r.cpu_milli // 1000) * 1000 < shared:
            return False
    elif pool * 1000 - shared < r.cpu_milli:
        return False
    exclusive = not cap.gpu_sharing or r.gpu_memory == 0
    eligible = 0
    for gpu, total in cap.gpus.items():
        holders = [lease for lease in held if gpu in lease.gpus]
        used = sum(lease.gpus[gpu] for lease in holders)
        need = r.gpu_memory or total
        if exclusive:
            ok = not holders and total - used >= need
        else:
            ok = not any(lease.exclusive_gpu for lease in holders) and total - used >= need
        eligible += ok
    return eligible >= r.gpus


def _feasible(cap: Capacity, r: Requirements) -> bool:
    if r.memory > cap.memory or (r.cpu_milli >= 1000 and r.cpu_milli // 1000 > len(cap.cores)):
        return False
    return sum(1 for total in cap.gpus.values() if total >= r.gpu_memory) >= r.gpus


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=node_and_ops())
def test_fit_logic_matches_the_spec(case: tuple[Capacity, list[tuple[str, object]]]) -> None:
    capacity, ops = case
    fake = fakeredis.FakeRedis()
    ledger = Ledger(fake, "prop", ttl=60)
    ledger.set_capacity(capacity)
    held: list[Lease] = []
    for op, arg in ops:
        if op == "release":
            if held:
                ledger.release(held.pop(int(arg) % len(held)))  # type: ignore[call-overload]
            continue
        r = arg
        assert isinstance(r, Requirements)
        expected = _fits(capacity, held, r) if _feasible(capacity, r) else None
        result = ledger.try_reserve(r, holder="p")
        if isinstance(result, Lease):
            assert expected is True, f"granted {r} though the spec says it does not fit"
            held.append(result)
        else:
            want = {None: "infeasible", False: "busy"}.get(expected, "granted")
            assert result.why == want, f"{r}: ledger said {result}, spec says {want}"
        usage = ledger.usage()
        assert usage.memory_used == sum(lease.memory for lease in held) <= capacity.memory
        assert all(used == 1000 for used in usage.core_milli_used.values())
        pool = [c for c in capacity.cores if not usage.core_milli_used.get(c)]
        assert usage.shared_milli_used == sum(lease.cpu_shared for lease in held) <= 1000 * len(pool)
        if isinstance(result, Lease) and result.cpu_shared:
            assert result.core_ids == sorted(pool)  # a fraction's affinity: the whole shared pool
        for gpu, total in capacity.gpus.items():
            assert usage.gpu_memory_used.get(gpu, 0) <= total
        # the placement indexes say exactly what is free
        free = {name: fake.zscore(key, "prop") for name, key in keys.index_free().items()}
        assert free["memory"] == capacity.memory - usage.memory_used
        assert free["core_milli"] == 1000 * len(pool) - usage.shared_milli_used
        assert free["whole_cores"] == (1000 * len(pool) - usage.shared_milli_used) // 1000
        assert free["gpus"] == sum(1 for g in capacity.gpus if not usage.gpu_holders.get(g))
    ledger.release(*held)
    assert ledger.usage().leases == []
    fake.flushall()
