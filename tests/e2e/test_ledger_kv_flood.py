"""Flood: 4 processes x 4 threads reserve KV caches against one node's KV budgets on a real Redis.

Each holder adds its lease's KV cache to an audit counter of every device it counts against
(``INCRBY``, which returns the total at that instant) right after the grant, and takes it off right
before releasing; if the ledger ever admitted more KV than a device's budget to leases held at the
same time, some holder would see an audit total above it. The requests mix the CPU and two GPUs,
generations sharing a GPU and tasks holding one alone, so the KV check runs inside every branch of
``reserve.lua``; ``tests/e2e/test_ledger_stress.py`` shows this auditor catching a check-then-add.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time

import redis

from hypha_celery.resources.ledger import Capacity, Lease, Ledger
from hypha_celery.resources.requirements import Requirements

PROCESSES = 4
THREADS = 4
ATTEMPTS = 300  # per thread: 4,800 in all
BUDGET = 1000  # KV bytes each device admits
CAPACITY = Capacity(cores=[0, 1, 2, 3], memory=10**9, gpus={0: 10**9, 1: 10**9}, kv_budget=BUDGET)
VIOLATIONS = "kvaudit:violations"
PEAKS = "kvaudit:peaks"


def _request(rng: random.Random) -> Requirements:
    kv = rng.randint(50, 400)
    gpus = rng.choice([0, 0, 1])
    return Requirements(cpu_milli=rng.choice([10, 100, 250]), memory=kv + 10, gpus=gpus,
                        gpu_memory=kv + 10 if gpus else 0, kv=kv,
                        gpu_exclusive=rng.choice([False, False, False, True]) if gpus else None)


def _audit(client: redis.Redis, lease: Lease, sign: int, peaks: dict[str, int]) -> None:
    devices = list(lease.kv_devices)
    with client.pipeline(transaction=False) as pipe:
        for device in devices:
            pipe.incrby(f"kvaudit:{device}", sign * lease.kv)
        totals = pipe.execute()
    for device, total in zip(devices, totals, strict=True):
        peaks[device] = max(peaks.get(device, 0), total)
        if total > BUDGET:
            client.rpush(VIOLATIONS, f"{device}={total}>{BUDGET}")


def _thread(client: redis.Redis, seed: int, peaks: dict[str, int]) -> None:
    ledger = Ledger(client, "kv-flood", ttl=30)
    rng = random.Random(seed)
    for _ in range(ATTEMPTS):
        answer = ledger.try_reserve(_request(rng), holder=f"t{seed}")
        if not isinstance(answer, Lease):
            client.hincrby("kvaudit:refused", f"{answer.why}:{answer.resource}", 1)
            continue
        client.incr("kvaudit:granted")
        _audit(client, answer, +1, peaks)
        time.sleep(rng.random() / 1000)
        _audit(client, answer, -1, peaks)
        ledger.release(answer)


def _process(url: str, seed: int) -> None:
    client = redis.Redis.from_url(url, max_connections=THREADS + 2)
    peaks: dict[str, int] = {}
    threads = [threading.Thread(target=_thread, args=(client, seed * THREADS + i, peaks)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for device, peak in peaks.items():
        client.rpush(PEAKS, f"{device}={peak}")
    client.close()


def test_a_flood_of_generations_never_holds_more_kv_than_the_budget(redis_client: redis.Redis, redis_url: str) -> None:
    # Given one node whose CPU and two GPUs each admit 1,000 bytes of KV cache
    ledger = Ledger(redis_client, "kv-flood", ttl=30)
    ledger.set_capacity(CAPACITY)
    # When 16 threads in 4 processes reserve and release 4,800 generations of 50-400 bytes of KV each
    context = multiprocessing.get_context("spawn")  # the test process has threads a fork could inherit locked
    processes = [context.Process(target=_process, args=(redis_url, seed)) for seed in range(PROCESSES)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(300)
        assert process.exitcode == 0
    # Then the auditor never saw a device hold more than its budget ...
    assert redis_client.lrange(VIOLATIONS, 0, -1) == []
    # ... though the flood pressed on it: many grants, many refusals for the KV budget, and holders together
    # near the budget on every device
    refused = {key.decode(): int(value) for key, value in redis_client.hgetall("kvaudit:refused").items()}
    assert int(redis_client.get("kvaudit:granted") or 0) > 1000
    assert refused.get("busy:kv", 0) > 100, refused
    peaks: dict[str, int] = {}
    for entry in redis_client.lrange(PEAKS, 0, -1):
        device, _, peak = entry.decode().partition("=")
        peaks[device] = max(peaks.get(device, 0), int(peak))
    assert set(peaks) == {"cpu", "0", "1"} and min(peaks.values()) > BUDGET // 2, peaks
    # ... and every KV byte came back with its lease
    usage = ledger.usage()
    assert usage.leases == [] and {device: kv.used for device, kv in usage.kv.items()} == {"cpu": 0, "0": 0, "1": 0}
