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
from hypha_celery.resources.ledger import Capacity, Lease, LeaseKeeper, Ledger, Refusal
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


def test_whole_cores_are_pinned_exclusively_and_fractions_pack(ledger: Ledger) -> None:
    two = ledger.reserve(req(cpu_cores=2), holder="a")
    assert two.cores == {0: 1000, 1: 1000}
    # fractions go to the fullest core they fit (best fit), leaving whole cores whole
    quarter = ledger.reserve(req(cpu_cores=0.25), holder="b")
    half = ledger.reserve(req(cpu_cores=0.5), holder="c")
    assert quarter.core_ids == half.core_ids == [2]
    assert ledger.reserve(req(cpu_cores=1), holder="d").cores == {3: 1000}
    with pytest.raises(ResourcesBusy, match="cpu"):
        ledger.reserve(req(cpu_cores=1), holder="e")


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
    assert score == {"memory": 750 * MiB, "core_milli": 1000, "whole_cores": 2, "gpus": 1, "gpu_memory": 80_000}
    ledger.release(lease)
    assert client.zscore(keys.index_free()["memory"], "node-a") == 1000 * MiB
    assert client.zscore(keys.index_free()["gpus"], "node-a") == 2


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
    core_use = {c: sum(lease.cores.get(c, 0) for lease in held) for c in cap.cores}
    if r.cpu_milli >= 1000:
        if sum(1 for used in core_use.values() if used == 0) < r.cpu_milli // 1000:
            return False
    elif not any(1000 - used >= r.cpu_milli for used in core_use.values()):
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
        assert all(used <= 1000 for used in usage.core_milli_used.values())
        for gpu, total in capacity.gpus.items():
            assert usage.gpu_memory_used.get(gpu, 0) <= total
        # the placement indexes say exactly what is free
        free = {name: fake.zscore(key, "prop") for name, key in keys.index_free().items()}
        assert free["memory"] == capacity.memory - usage.memory_used
        assert free["whole_cores"] == sum(1 for c in capacity.cores if not usage.core_milli_used.get(c))
        assert free["core_milli"] == max(1000 - usage.core_milli_used.get(c, 0) for c in capacity.cores)
        assert free["gpus"] == sum(1 for g in capacity.gpus if not usage.gpu_holders.get(g))
    ledger.release(*held)
    assert ledger.usage().leases == []
    fake.flushall()
