"""A ledger outage longer than the lease TTL: the running task's lease is taken back, so the node never over-commits."""

from __future__ import annotations

import os
import signal
import time

import redis

from hypha_celery.harness.embedded_redis import EmbeddedRedis
from hypha_celery.harness.launch import wait_for
from hypha_celery.resources.ledger import Ledger

HEARTBEAT = 1  # lease TTL: 2 s


def task_leases(ledger: Ledger) -> dict[str, dict]:
    """The node's task leases by task id."""
    return {lease["t"]: lease for lease in ledger.usage().leases if lease.get("k") == "task"}


def test_a_lease_lost_in_a_ledger_outage_is_taken_back(start_worker, celery_client) -> None:
    # Given a 2-core node whose ledger lives in a Redis of its own, and a task holding both cores
    with EmbeddedRedis() as registry:
        worker = start_worker({"resources": {"node_id": "outage", "cpu_cores": 2, "lease_heartbeat": HEARTBEAT}},
                              env={"HYPHA_REGISTRY_URL": registry.url})
        client = redis.Redis.from_url(registry.url)
        ledger = Ledger(client, "outage")
        app = celery_client()
        first = app.send_task("hypha.noop", kwargs={"hold_s": 12, "requirements": {"cpu_cores": 2}})
        held = wait_for(lambda: task_leases(ledger).get(first.id), 30, "the first task's lease")
        # When the ledger's Redis stops answering for 4 s (> 2 x lease_heartbeat), so the lease expires unrenewed
        assert registry.process is not None
        os.kill(registry.process.pid, signal.SIGSTOP)
        try:
            time.sleep(4 * HEARTBEAT)
        finally:
            os.kill(registry.process.pid, signal.SIGCONT)
        # Then, the task still running, its lease is in the ledger again: same id, same cores, both counted
        back = wait_for(lambda: task_leases(ledger).get(first.id), 10, "the lease taken back")
        assert (back["id"], back["c"]) == (held["id"], held["c"])
        assert first.state == "STARTED" and ledger.usage().core_milli_used == {0: 1000, 1: 1000}
        # ... so a one-core task sent now waits instead of running beside it on a node with no core free
        second = app.send_task("hypha.noop", kwargs={"hold_s": 0.1, "requirements": {"cpu_cores": 1}})
        ran_first, ran_second = first.get(timeout=60), second.get(timeout=60)
        assert ran_second["metrics"]["started_at"] >= ran_first["metrics"]["finished_at"]
        # ... and the take-back was logged once, not at every renewal after it
        assert worker.output().count("took back") == 1
        client.close()
