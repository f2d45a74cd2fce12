"""Admission with real workers: tasks run only inside a reservation; busy waits, infeasible fails."""

from __future__ import annotations

import os
import time
import uuid

import pytest
import redis

from hypha_celery import keys
from hypha_celery.client import submit
from hypha_celery.errors import ExcessiveMemoryRequest, InsufficientCapabilities
from hypha_celery.harness.launch import wait_for
from hypha_celery.resources.ledger import Ledger

GB = 10**9


def task_leases(ledger: Ledger) -> list[dict]:
    return [lease for lease in ledger.usage().leases if lease.get("k") == "task"]


def test_a_flood_five_times_memory_completes_within_capacity(start_worker, celery_client, redis_client) -> None:
    # Given a node with 1 GB to offer and 8 task slots
    start_worker({"max_concurrent_tasks": 8, "max_memory_per_task": "1GB",
                           "resources": {"node_id": "flood", "memory": "1GB"}})
    app = celery_client()
    # When 13 tasks of 400 MB each (5.2 GB in all) arrive together
    results = [app.send_task("hypha.noop", kwargs={"hold_s": 0.5, "requirements": {"memory": "400MB", "cpu_cores": 0.1}})
               for _ in range(13)]
    states: set[str] = set()
    attempts: dict[str, int] = {}  # the highest WAITING attempt seen in each task's result-backend state
    while not all(r.ready() for r in results):
        for r in results:
            meta = app.backend.get_task_meta(r.id)
            states.add(meta["status"])
            if meta["status"] == "WAITING":
                attempts[r.id] = max(attempts.get(r.id, 0), meta["result"]["attempt"])
        time.sleep(0.05)
    # Then all complete, none failed, and some were seen waiting (not failed) while others ran
    done = [r.get(timeout=5) for r in results]
    assert "WAITING" in states and "FAILURE" not in states
    # ... and at no instant did the running ones hold more than the node's memory
    events = sorted([(d["metrics"]["started_at"], 400 * 10**6) for d in done] +
                    [(d["metrics"]["finished_at"], -400 * 10**6) for d in done], key=lambda e: (e[0], e[1]))
    held = peak = 0
    for _, delta in events:
        held += delta
        peak = max(peak, held)
    assert peak <= 1 * GB
    # ... and waiting cost a bounded number of attempts (backoff, no requeue spin)
    assert attempts and max(attempts.values()) <= 40, attempts
    # ... and every lease is back (released from the worker's keeper thread, moments after each task)
    wait_for(lambda: task_leases(Ledger(redis_client, "flood")) == [], 5, "the leases to be released")


def test_over_limit_and_infeasible_fail_at_once(start_worker, celery_client, redis_client) -> None:
    start_worker({"resources": {"node_id": "small"}})
    app = celery_client()
    busy = app.send_task("hypha.noop", kwargs={"hold_s": 1.0, "requirements": {"memory": "100MB"}})
    # A request above max_memory_per_task (2GB) can never run here
    with pytest.raises(ExcessiveMemoryRequest, match="max_memory_per_task"):
        app.send_task("hypha.noop", kwargs={"requirements": {"memory": "3GB"}}).get(timeout=30)
    # A GPU request on a registry of CPU-only workers can never run anywhere
    with pytest.raises(InsufficientCapabilities, match="largest seen has"):
        app.send_task("hypha.noop", kwargs={"requirements": {"gpus": 1}}).get(timeout=30)
    # ... and nothing else was disturbed
    assert busy.get(timeout=30)["output"] is None
    wait_for(lambda: task_leases(Ledger(redis_client, "small")) == [], 5, "the leases to be released")


def test_a_task_too_big_for_its_node_moves_to_one_that_fits(start_worker, celery_client) -> None:
    small = start_worker({"max_memory_per_task": "3GB", "resources": {"node_id": "small", "memory": "1GB"}})
    start_worker({"max_memory_per_task": "3GB", "resources": {"node_id": "big", "memory": "3GB"}})
    small_id = f"{small.name}@{os.uname().nodename}"
    app = celery_client()
    wait_for(lambda: len(app.control.ping(timeout=0.5)) == 2, 20, "both workers")
    # When a 2 GB task is sent to the small worker's own queue
    result = app.send_task("hypha.noop", kwargs={"requirements": {"memory": "2GB"}}, queue=keys.worker_queue(small_id))
    # Then the small worker forwards it and the big one runs it
    assert result.get(timeout=60)["worker"] != small_id


def test_a_busy_worker_hands_work_to_a_free_one(start_worker, celery_client) -> None:
    a = start_worker({"resources": {"node_id": "a", "memory": "1GB"}, "max_memory_per_task": "1GB"})
    start_worker({"resources": {"node_id": "b", "memory": "1GB"}, "max_memory_per_task": "1GB"})
    a_id = f"{a.name}@{os.uname().nodename}"
    app = celery_client()
    wait_for(lambda: len(app.control.ping(timeout=0.5)) == 2, 20, "both workers")
    holding = app.send_task("hypha.noop", kwargs={"hold_s": 5, "requirements": {"memory": "900MB"}},
                            queue=keys.worker_queue(a_id))
    wait_for(lambda: holding.state == "STARTED", 20, "a to be busy")
    moved = app.send_task("hypha.noop", kwargs={"requirements": {"memory": "900MB"}}, queue=keys.worker_queue(a_id))
    assert moved.get(timeout=30)["worker"] != a_id
    assert holding.get(timeout=30)["worker"] == a_id


def test_a_redelivered_copy_does_not_run_twice(start_worker, celery_client) -> None:
    worker = start_worker({"resources": {"node_id": "dup"}})
    app = celery_client()
    task_id = str(uuid.uuid4())
    # Given a task running under its lease
    first = app.send_task("hypha.noop", kwargs={"hold_s": 2}, task_id=task_id)
    wait_for(lambda: first.state == "STARTED", 20, "the first copy to start")
    # When the broker delivers the same task id again (visibility timeout, Celery #5935)
    app.send_task("hypha.noop", kwargs={"hold_s": 2}, task_id=task_id)
    ran = first.get(timeout=30)
    # Then the copy met the live lease (the operator is told), waited, saw the result and was dropped
    wait_for(lambda: "dropping the redelivered copy" in worker.output(), 20, "the copy to be dropped")
    assert "already running under lease" in worker.output()
    # ... so the result backend still holds the one run's result (a second run would have overwritten it)
    assert app.backend.get_task_meta(task_id)["result"]["metrics"]["started_at"] == ran["metrics"]["started_at"]


def test_kill_9_mid_task_is_redelivered_to_the_other_worker(start_worker, celery_client, redis_client) -> None:
    # Given worker A running a task from the shared queue under a lease (heartbeat 1 s)
    config = {"task_timeout": 8, "admission": {"backoff_max": 1.0}}
    a = start_worker({**config, "resources": {"node_id": "node-a"}})
    app = celery_client()
    result = app.send_task("hypha.noop", kwargs={"hold_s": 4})
    wait_for(lambda: task_leases(Ledger(redis_client, "node-a")), 20, "A to hold the lease")
    b = start_worker({**config, "resources": {"node_id": "node-b"}})
    b_id = f"{b.name}@{os.uname().nodename}"
    # When A is killed -9 (with its executors)
    a.kill9()
    seconds, micros = redis_client.time()
    killed_ms = seconds * 1000 + micros // 1000
    [lease] = task_leases(Ledger(redis_client, "node-a"))
    # Then its lease expires within 2 x heartbeat of the kill (its expiry is on the Redis clock) and is reaped
    assert lease["e"] - killed_ms <= 2 * 1000
    wait_for(lambda: not task_leases(Ledger(redis_client, "node-a")), 30, "A's lease to be reaped")
    # ... and the unacked message comes back (re-published by the queue sweeper) and completes on B
    assert result.get(timeout=120)["worker"] == b_id


def test_submit_places_on_the_best_fit(start_worker, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPHA_BROKER_URL", redis_url)
    monkeypatch.setenv("HYPHA_RESULT_BACKEND", redis_url)
    monkeypatch.setenv("HYPHA_REGISTRY_URL", redis_url)
    small = start_worker({"resources": {"node_id": "small", "memory": "1GB"}, "max_memory_per_task": "1GB"})
    big = start_worker({"resources": {"node_id": "big", "memory": "3GB"}})
    r = redis.Redis.from_url(redis_url)
    wait_for(lambda: r.zcard(keys.workers()) == 2, 20, "both in the registry")
    from hypha_celery.celery import app

    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    # A 500 MB task fits both: best fit is the smaller node; a 1.5 GB one fits only the big node
    assert submit("hypha.noop", requirements={"memory": "500MB"}).get(timeout=30)["worker"].startswith(small.name)
    assert submit("hypha.noop", requirements={"memory": "1500MB"}).get(timeout=30)["worker"].startswith(big.name)
    # Plain apply_async with requirements is placed by the router too
    routed = app.send_task("hypha.noop", kwargs={"requirements": {"memory": "1500MB"}})
    assert routed.get(timeout=30)["worker"].startswith(big.name)
    # Nothing anywhere could ever fit 100 GB: refused before sending
    with pytest.raises(InsufficientCapabilities):
        submit("hypha.noop", requirements={"memory": "100GB"})
    r.close()
