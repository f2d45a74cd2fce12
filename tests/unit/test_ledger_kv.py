"""The ledger's KV budget and shared devices, on fakeredis (the same Lua as Redis).

A generation's reservation carries its KV cache (``Requirements.kv``): admitted against its device's
KV budget in the same atomic script as the rest of the lease, and given back with it.
``tests/e2e/test_ledger_kv_flood.py`` floods a real Redis from several processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest
import redis

from hypha_celery.errors import InvalidTask, ResourcesBusy
from hypha_celery.resources.ledger import Capacity, Lease, Ledger, Refusal
from hypha_celery.resources.requirements import Requirements

MiB = 2**20


def kv_request(kv: int, *, memory: int | None = None, **fields: object) -> Requirements:
    """A generation as sizing writes it: its KV cache is part of its memory (or gpu_memory) and counted apart."""
    return Requirements(cpu_milli=100, memory=memory if memory is not None else kv + MiB, kv=kv, **fields)  # type: ignore[arg-type]


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    fake = fakeredis.FakeRedis()
    yield fake
    fake.flushall()


def node(client: redis.Redis, **capacity: object) -> Ledger:
    ledger = Ledger(client, "kv-node", ttl=5)
    ledger.set_capacity(Capacity(**{"cores": [0, 1], "memory": 1000 * MiB, **capacity}))  # type: ignore[arg-type]
    return ledger


def test_a_full_kv_budget_refuses_as_busy_until_a_holder_leaves(client: redis.Redis) -> None:
    # Given a node whose CPU admits 100 MiB of KV cache, 60 MiB of it held by one generation
    ledger = node(client, kv_budget=100 * MiB)
    first = ledger.reserve(kv_request(60 * MiB), holder="w", task_id="first")
    assert (first.kv, first.kv_devices) == (60 * MiB, ("cpu",))
    # When a second generation of 60 MiB asks (memory and cores are free: only the budget is short)
    answer = ledger.try_reserve(kv_request(60 * MiB), holder="w", task_id="second")
    # Then it is busy on "kv" (deferred, never failed), and the error says so
    assert answer == Refusal(why="busy", resource="kv")
    with pytest.raises(ResourcesBusy, match="KV budget is full"):
        raise ledger.refusal(kv_request(60 * MiB), answer)
    # ... the usage shows the budget, what is held and by which task
    kv = ledger.usage().kv["cpu"]
    assert (kv.budget, kv.used, kv.holders) == (100 * MiB, 60 * MiB, ["first"])
    # ... and once the first leaves, the second is admitted
    ledger.release(first)
    second = ledger.reserve(kv_request(60 * MiB), holder="w", task_id="second")
    assert ledger.usage().kv["cpu"].used == 60 * MiB
    ledger.release(second)
    assert ledger.usage().kv["cpu"].used == 0


def test_a_kv_cache_over_the_whole_budget_is_infeasible(client: redis.Redis) -> None:
    ledger = node(client, kv_budget=100 * MiB)
    assert ledger.try_reserve(kv_request(101 * MiB), holder="w") == Refusal(why="infeasible", resource="kv")


def test_the_auto_budget_is_memory_less_model_caches_less_a_tenth(client: redis.Redis) -> None:
    # Given an auto budget on a 1000 MiB node whose serving executor holds a 300 MiB model
    ledger = node(client)
    assert ledger.usage().kv["cpu"].budget == 900 * MiB
    ledger.account("cache:cpu", memory=300 * MiB, holder="model cache on cpu")
    assert ledger.usage().kv["cpu"].budget == 600 * MiB
    # When 500 MiB of KV is held, another 200 MiB fits the memory but not the budget
    held = ledger.reserve(kv_request(500 * MiB, memory=500 * MiB), holder="w")
    assert ledger.try_reserve(kv_request(150 * MiB, memory=150 * MiB), holder="w") == Refusal("busy", "kv")
    # ... and a task without a KV cache is not held back by it
    assert isinstance(ledger.try_reserve(Requirements(cpu_milli=100, memory=150 * MiB), holder="w"), Lease)
    # When the cache is evicted, the budget grows back
    ledger.account("cache:cpu", memory=0)
    assert ledger.usage().kv["cpu"].budget == 900 * MiB
    ledger.release(held)


def test_serving_requests_share_a_gpu_that_training_holds_alone(client: redis.Redis) -> None:
    # Given a node that does not share GPUs (gpu_sharing = false), one GPU of 1000 MiB
    ledger = node(client, gpus={0: 1000 * MiB}, kv_budget=300 * MiB)
    # When two generations ask for a shared slice of it, each with its KV cache
    shared = [ledger.reserve(kv_request(100 * MiB, memory=MiB, gpus=1, gpu_memory=150 * MiB, gpu_exclusive=False),
                             holder="w") for _ in range(2)]
    # Then both run on GPU 0, neither alone, and the GPU's budget counts both KV caches
    assert [(lease.gpu_ids, lease.exclusive_gpu, lease.kv_devices) for lease in shared] == [([0], False, ("0",))] * 2
    assert ledger.usage().kv["0"].used == 200 * MiB
    # ... a third would pass the GPU's free memory but not its KV budget
    third = kv_request(150 * MiB, memory=MiB, gpus=1, gpu_memory=200 * MiB, gpu_exclusive=False)
    assert ledger.try_reserve(third, holder="w") == Refusal("busy", "kv")
    # ... and a training task (the node's mode: alone) or one asking gpu_exclusive waits for the device
    training = Requirements(cpu_milli=1000, memory=MiB, gpus=1, gpu_memory=100 * MiB)
    assert ledger.try_reserve(training, holder="w") == Refusal("busy", "gpu")
    alone = Requirements(cpu_milli=100, memory=MiB, gpus=1, gpu_memory=100 * MiB, gpu_exclusive=True)
    assert ledger.try_reserve(alone, holder="w") == Refusal("busy", "gpu")
    ledger.release(*shared)
    held = ledger.reserve(training, holder="w")
    assert held.exclusive_gpu
    # ... and while it holds the device, no serving request shares it
    assert ledger.try_reserve(kv_request(MiB, gpus=1, gpu_memory=MiB, gpu_exclusive=False), holder="w") \
        == Refusal("busy", "gpu")


def test_an_expired_or_retaken_lease_gives_back_and_takes_back_its_kv(client: redis.Redis) -> None:
    ledger = node(client, kv_budget=100 * MiB)
    lease = ledger.try_reserve(kv_request(40 * MiB), holder="w", ttl=0.001)
    assert isinstance(lease, Lease)
    client.zadd(ledger.schema.ledger("kv-node")["leases"], {lease.id: 0})  # expired
    assert ledger.usage().kv["cpu"].used == 0
    # Taken back as it was (the holder still runs): its KV counts again
    assert ledger.retake([lease]) == {lease.id: []}
    assert ledger.usage().kv["cpu"].used == 40 * MiB and ledger.usage().kv["cpu"].holders == ["w"]


def test_requirements_parse_the_sharing_of_serving_requests() -> None:
    assert Requirements.parse(None).cpu_milli == 1000 and Requirements.parse(None).gpu_exclusive is None
    serving = Requirements.parse(None, serving_cpu_milli=100)
    assert (serving.cpu_milli, serving.gpu_exclusive) == (100, False)
    assert Requirements.parse({"gpu_exclusive": True, "gpus": 1}, serving_cpu_milli=100).gpu_exclusive is True
    with pytest.raises(InvalidTask, match="gpu_exclusive must be true or false"):
        Requirements.parse({"gpu_exclusive": "yes"})
    assert "1 KiB KV cache" in Requirements(kv=1024).describe()


def test_the_budget_and_its_holders_show_in_hypha_celery_workers(client: redis.Redis) -> None:
    from hypha_celery.cli.workers import _table

    # Given a node whose CPU budget one generation holds part of
    ledger = node(client, kv_budget=100 * MiB)
    ledger.reserve(kv_request(60 * MiB), holder="w", task_id="gen-1")
    usage = ledger.usage()
    # Then the usage's JSON (what the registry record carries as "kv") and the table both show it
    assert usage.to_json()["kv"]["cpu"] == {"budget": 100 * MiB, "used": 60 * MiB, "free": 40 * MiB,
                                            "holders": ["gen-1"]}
    row = {"worker_id": "w@host", "node_id": "kv-node", "kv": usage.to_json()["kv"]}
    header, line = _table([row]).splitlines()
    assert "KV used/budget (requests)" in header and "60 MiB/100 MiB (1)" in line
    assert " - " in _table([{"worker_id": "old@host"}]).splitlines()[1]  # a record from before KV budgets
