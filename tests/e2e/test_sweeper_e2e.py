"""Nothing waits for a dead worker: the queue sweeper on a real Redis broker, alone and inside real workers.

Every worker here has a ``task_timeout`` of an hour, so kombu's own redelivery (after
``visibility_timeout``, about 3,640 s) cannot be what brings a task back within a test's timeout.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.utils.json import loads

from hypha_celery import keys
from hypha_celery.harness.launch import wait_for
from hypha_celery.keys import KeySchema
from hypha_celery.resources.ledger import Ledger
from hypha_celery.worker.sweeper import BrokerQueues, Sweeper

LONG = {"task_timeout": 3600}
DEAD = "dead@host"


def worker_id(worker: Any) -> str:
    return f"{worker.name}@{os.uname().nodename}"


def task_leases(redis_client: redis.Redis, node: str) -> list[dict]:
    return [lease for lease in Ledger(redis_client, node).usage().leases if lease.get("k") == "task"]


# --- real workers -------------------------------------------------------------------------------


def test_a_killed_workers_task_runs_again_on_another_worker_long_before_the_visibility_timeout(
    start_worker, celery_client, redis_client
) -> None:
    # Given worker A running a task from the shared queue, and worker B idle
    a = start_worker({**LONG, "resources": {"node_id": "node-a"}})
    app = celery_client()
    result = app.send_task("hypha.noop", kwargs={"hold_s": 5})
    wait_for(lambda: task_leases(redis_client, "node-a"), 20, "A to hold the task's lease")
    b = start_worker({**LONG, "resources": {"node_id": "node-b"}})
    # When A is killed -9
    a.kill9()
    # Then B runs the same task (same id) to the end: its message came back without waiting an hour
    assert result.get(timeout=60)["worker"] == worker_id(b)
    # ... and the sweeper said why
    wait_for(lambda: "re-published to hypha" in b.output(), 10,
             "the re-publish to be logged")


def test_a_worker_that_dies_for_good_strands_nothing_on_its_own_queue(start_worker, celery_client, redis_client) -> None:
    # Given workers A and B, and B running a task that was placed on its own queue
    a = start_worker({**LONG, "resources": {"node_id": "node-a"}})
    b = start_worker({**LONG, "resources": {"node_id": "node-b"}})
    app = celery_client()
    own = keys.worker_queue(worker_id(b))
    running = app.send_task("hypha.noop", kwargs={"hold_s": 5}, queue=own)
    wait_for(lambda: task_leases(redis_client, "node-b"), 20, "B to hold the task's lease")
    # When B is killed -9 for good, and more tasks are placed on its queue (its record has not expired yet)
    b.kill9()
    placed = [app.send_task("hypha.noop", kwargs={}, queue=own) for _ in range(2)]
    # Then every one of them completes on A
    assert [r.get(timeout=60)["worker"] for r in (running, *placed)] == [worker_id(a)] * 3
    # ... and nothing is left in B's queue or reserved for B
    assert redis_client.llen(own) == 0
    wait_for(lambda: redis_client.hlen("unacked") == 0, 10, "every reservation to be acked")
    assert "moved" in a.output() and own in a.output()


def test_a_task_deferred_to_a_dead_workers_queue_reaches_a_live_worker(start_worker, celery_client) -> None:
    # Given A and B with room for one 900 MB task each, and B killed -9 for good while its record
    # still advertises that room (it expires 90 s after its last refresh)
    room = {**LONG, "max_memory_per_task": "1GB"}
    a = start_worker({**room, "resources": {"node_id": "node-a", "memory": "1GB"}})
    b = start_worker({**room, "resources": {"node_id": "node-b", "memory": "1GB"},
                      "network": {"advertisement_interval": 30}})
    b.kill9()
    app = celery_client()
    own = keys.worker_queue(worker_id(a))
    big = {"requirements": {"memory": "900MB"}}
    holding = app.send_task("hypha.noop", kwargs={**big, "hold_s": 5}, queue=own)
    wait_for(lambda: holding.state == "STARTED", 20, "A to run the first task")
    # When a second one arrives at A while A is full, and A defers it to B, which placement still lists
    deferred = app.send_task("hypha.noop", kwargs=big, queue=own)
    wait_for(lambda: f"on {keys.worker_queue(worker_id(b))}" in a.output(), 20, "A to defer the task to B's queue")
    # Then it comes back from B's queue and completes on A
    assert deferred.get(timeout=60)["worker"] == worker_id(a)
    assert holding.get(timeout=30)["worker"] == worker_id(a)


# --- the sweeper alone, against the broker's own keys ----------------------------------------------


@pytest.fixture
def broker(redis_url: str, redis_client: redis.Redis) -> Iterator[BrokerQueues]:
    connection = Connection(redis_url)
    yield BrokerQueues(connection.default_channel)
    connection.release()


def sweeper(broker: BrokerQueues, client: redis.Redis, worker: str, held: list[str] | None = None) -> Sweeper:
    made = Sweeper(broker, client, worker, heartbeat=1.0, shared_queue="hypha", shared_route=("hypha", "hypha"),
                   held=lambda: list(held or []), schema=KeySchema())
    made.settled_at = 0.0  # no start-up quiet period in these tests
    return made


def reserve(broker: BrokerQueues, queue: str) -> Any:
    """What a consumer does on delivery: take the message, keep it in kombu's unacked hash."""
    message = broker.channel.basic_get(queue, no_ack=False)
    assert message is not None
    return message


def messages(client: redis.Redis, queue: str) -> list[dict]:
    """A queue's messages, the next one to be consumed first."""
    return [loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def test_an_orphaned_reservation_goes_back_to_the_shared_queue_as_the_same_message(
    broker, celery_client, redis_client
) -> None:
    # Given a signed-looking task reserved from a dead worker's own queue, untouched since
    app = celery_client()
    task_id = str(uuid.uuid4())
    envelope = {"v": 1, "sig": "abc", "expires": 1764468000.123456789}
    app.send_task("hypha.noop", task_id=task_id, queue=keys.worker_queue(DEAD), headers={"hypha_envelope": envelope})
    reserved = reserve(broker, keys.worker_queue(DEAD))
    original = loads(redis_client.hget("unacked", reserved.delivery_tag))[0]
    # When a live worker sweeps, later than two heartbeats after the reservation
    moved = sweeper(broker, redis_client, "live@host").requeue_orphans(broker.now() + 10)
    # Then the message is on the shared queue, no longer reserved
    assert moved == 1
    assert redis_client.hlen("unacked") == 0 and redis_client.zcard("unacked_index") == 0
    [copy] = messages(redis_client, "hypha")
    # ... with the same id, envelope and body, routed to the shared queue and marked redelivered
    assert copy["headers"]["id"] == task_id
    assert copy["headers"]["hypha_envelope"] == envelope
    assert copy["body"] == original["body"]
    assert copy["properties"]["delivery_tag"] == original["properties"]["delivery_tag"]
    assert copy["properties"]["delivery_info"] == {"exchange": "hypha", "routing_key": "hypha", "redelivered": True}


def test_a_reservation_its_live_holder_touches_stays_put(broker, celery_client, redis_client) -> None:
    # Given a task reserved by a worker that touches what it holds
    app = celery_client()
    app.send_task("hypha.noop", queue="hypha")
    reserved = reserve(broker, "hypha")
    holder = sweeper(broker, redis_client, "holder@host", held=[reserved.delivery_tag])
    # When the holder touches it and another worker sweeps within two heartbeats of that touch
    holder.broker.touch(holder.held(), broker.now() + 10)
    moved = sweeper(broker, redis_client, "live@host").requeue_orphans(broker.now() + 10)
    # Then it stays reserved
    assert moved == 0
    assert redis_client.hexists("unacked", reserved.delivery_tag) and redis_client.llen("hypha") == 0


def test_a_task_still_under_a_live_lease_is_not_re_published(broker, celery_client, redis_client) -> None:
    # Given an untouched reservation whose task a live lease still runs
    app = celery_client()
    task_id = str(uuid.uuid4())
    app.send_task("hypha.noop", task_id=task_id, queue="hypha")
    reserve(broker, "hypha")
    redis_client.set(KeySchema().task_guard(task_id), "lease-1", px=60_000)
    # When a worker sweeps
    moved = sweeper(broker, redis_client, "live@host").requeue_orphans(broker.now() + 10)
    # Then it is left to its holder
    assert moved == 0 and redis_client.hlen("unacked") == 1


def test_another_apps_reservation_is_left_to_kombu(broker, celery_client, redis_client) -> None:
    # Given an untouched reservation of a task that is not hypha's, and one of a hypha task
    app = celery_client()
    app.send_task("other.task", queue="hypha")
    foreign = reserve(broker, "hypha")
    ours = app.send_task("hypha.noop", queue="hypha").id
    reserve(broker, "hypha")
    # When a worker sweeps twice
    sweeping = sweeper(broker, redis_client, "live@host")
    moved = [sweeping.requeue_orphans(broker.now() + 10) for _ in range(2)]
    # Then only the hypha task went back to the queue, once; the other stays reserved for kombu's restore
    assert moved == [1, 0]
    assert [m["headers"]["id"] for m in messages(redis_client, "hypha")] == [ours]
    assert redis_client.hkeys("unacked") == [foreign.delivery_tag.encode()]


def test_a_reservation_acked_after_it_was_read_is_not_moved(broker, celery_client, redis_client) -> None:
    # Given a reservation read by the sweeper, then acked by its holder before the move
    app = celery_client()
    app.send_task("hypha.noop", queue="hypha")
    reserved = reserve(broker, "hypha")
    raw = broker.reserved(reserved.delivery_tag)
    assert raw is not None
    reserved.ack()
    # When the sweeper moves what it read
    moved = broker.requeue(reserved.delivery_tag, raw, loads(raw)[0], "hypha")
    # Then nothing moves: the compare-and-move saw the message gone
    assert moved is False and redis_client.llen("hypha") == 0


def test_a_dead_workers_queue_drains_to_the_shared_queue_in_order(broker, celery_client, redis_client) -> None:
    # Given a dead worker's queue with three tasks (one of high priority) and a live worker's queue with one
    app = celery_client()
    schema = KeySchema()
    sent = [app.send_task("hypha.noop", queue=keys.worker_queue(DEAD)).id for _ in range(2)]
    urgent = app.send_task("hypha.noop", queue=keys.worker_queue(DEAD), priority=9).id
    kept = app.send_task("hypha.noop", queue=keys.worker_queue("live@host")).id
    now = float(redis_client.time()[0])
    redis_client.zadd(schema.queue_owners(), {DEAD: now - 1, "live@host": now + 60})
    # When a worker sweeps
    moved = sweeper(broker, redis_client, "live@host").drain_dead_queues()
    # Then the dead worker's tasks are on the shared queue, in the order they were sent, priority kept
    assert moved == 3
    assert [m["headers"]["id"] for m in messages(redis_client, "hypha")] == sent
    [high] = [loads(raw) for raw in redis_client.lrange(broker.lists("hypha")[-1], 0, -1)]
    assert high["headers"]["id"] == urgent
    assert all(m["properties"]["delivery_info"]["routing_key"] == "hypha" for m in messages(redis_client, "hypha"))
    # ... the live worker's queue is untouched, and the dead one's is empty
    assert [m["headers"]["id"] for m in messages(redis_client, keys.worker_queue("live@host"))] == [kept]
    assert sum(redis_client.llen(name) for name in broker.lists(keys.worker_queue(DEAD))) == 0


def test_one_worker_sweeps_at_a_time(broker, redis_client) -> None:
    # Given two live workers' sweepers
    first, second = sweeper(broker, redis_client, "one@host"), sweeper(broker, redis_client, "two@host")
    # When both try to lead, twice
    leads = [first._lead(), second._lead(), first._lead(), second._lead()]
    # Then the first leads both times and the second never
    assert leads == [True, False, True, False]
    # ... until the leader lets go
    first.release()
    assert second._lead() is True
