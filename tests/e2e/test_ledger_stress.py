"""Stress: 8 processes, 10,000 reserve/release attempts on one node's ledger, and an independent auditor.

Each holder adds what its lease holds to audit counters (``INCRBY``) right
after it is granted and takes it off right before releasing. ``INCRBY``
returns the total at that instant, so if the ledger ever granted more than
the capacity to leases held at the same time, some holder sees an audit total
above capacity. The same auditor run against the seed's check-then-add
manager catches it over-committing: the auditor can fail.
"""

from __future__ import annotations

import multiprocessing
import random
import time

import redis

from hypha_celery.resources.ledger import Capacity, Lease, Ledger
from hypha_celery.resources.requirements import Requirements

PROCESSES = 8
ATTEMPTS = 1250  # per process: 10,000 in all
CAPACITY = Capacity(cores=[0, 1, 2, 3], memory=1000, gpus={0: 80, 1: 40})
VIOLATIONS = "audit:violations"


def _random_request(rng: random.Random) -> Requirements:
    return Requirements(
        cpu_milli=rng.choice([250, 500, 750, 1000, 2000]),
        memory=rng.randint(50, 400),
        gpus=rng.choice([0, 0, 1]),
        gpu_memory=rng.choice([0, 10, 30]),
    )


def _audit(client: redis.Redis, lease: Lease, sign: int) -> None:
    checks = [("audit:memory", lease.memory, CAPACITY.memory)]
    # a core held alone is held by one lease; fractions share the pool of the others, so only their sum is bounded
    checks += [(f"audit:core:{c}", milli, 1000) for c, milli in lease.cores.items() if not lease.cpu_shared]
    checks += [("audit:cpu", sum(lease.cores.values()), 1000 * len(CAPACITY.cores))]
    checks += [(f"audit:gpu:{g}", amount, CAPACITY.gpus[g]) for g, amount in lease.gpus.items()]
    with client.pipeline(transaction=False) as pipe:
        for key, amount, _ in checks:
            pipe.incrby(key, sign * amount)
        totals = pipe.execute()
    for (key, _, limit), total in zip(checks, totals, strict=True):
        if total > limit:
            client.rpush(VIOLATIONS, f"{key}={total}>{limit}")


def _hammer(url: str, seed: int, node: str) -> None:
    client = redis.Redis.from_url(url)
    ledger = Ledger(client, node, ttl=30)
    rng = random.Random(seed)
    for _ in range(ATTEMPTS):
        lease = ledger.try_reserve(_random_request(rng), holder=f"p{seed}")
        if not isinstance(lease, Lease):
            continue
        client.incr("audit:granted")
        _audit(client, lease, +1)
        time.sleep(rng.random() / 2000)
        _audit(client, lease, -1)
        ledger.release(lease)
    client.close()


def _racy_hammer(url: str, seed: int) -> None:
    """The seed's MemoryManager: load, compare, then fetch_add - in Redis, across processes."""
    client = redis.Redis.from_url(url)
    rng = random.Random(seed)
    for _ in range(ATTEMPTS // 5):
        size = rng.randint(50, 400)
        current = int(client.get("racy:allocated") or 0)
        if current + size > CAPACITY.memory:
            continue
        time.sleep(0.0002)  # the window between the check and the add, widened so the race shows
        client.incrby("racy:allocated", size)
        total = client.incrby("audit:memory", size)
        if total > CAPACITY.memory:
            client.rpush(VIOLATIONS, f"audit:memory={total}>{CAPACITY.memory}")
        time.sleep(rng.random() / 2000)
        client.decrby("audit:memory", size)
        client.decrby("racy:allocated", size)
    client.close()


def _run(target: object, args_for: list[tuple[object, ...]]) -> None:
    # spawn, not fork: the test process has threads (other tests' lease keepers, batchers) whose
    # locks a forked child could inherit held
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=args) for args in args_for]  # type: ignore[attr-defined]
    for process in processes:
        process.start()
    for process in processes:
        process.join(240)
        assert process.exitcode == 0


def test_ten_thousand_attempts_never_exceed_capacity(redis_client: redis.Redis, redis_url: str) -> None:
    # Given one node's ledger
    ledger = Ledger(redis_client, "stress", ttl=30)
    ledger.set_capacity(CAPACITY)
    # When 8 processes reserve and release 10,000 times
    _run(_hammer, [(redis_url, seed, "stress") for seed in range(PROCESSES)])
    # Then the auditor never saw more than the capacity held at once (over thousands of grants)
    assert redis_client.lrange(VIOLATIONS, 0, -1) == []
    assert int(redis_client.get("audit:granted") or 0) > 1000
    # ... and no lease or usage remains
    usage = ledger.usage()
    assert usage.leases == []
    assert usage.memory_used == 0 and not usage.core_milli_used and not usage.gpu_memory_used and not usage.gpu_holders
    assert int(redis_client.get("audit:memory") or 0) == 0


def test_the_auditor_catches_the_seeds_check_then_add(redis_client: redis.Redis, redis_url: str) -> None:
    # Given the seed's manager (load, check, then fetch_add) shared by 8 processes
    _run(_racy_hammer, [(redis_url, seed) for seed in range(PROCESSES)])
    # Then the same auditor sees it grant more than the capacity
    assert redis_client.llen(VIOLATIONS) > 0
