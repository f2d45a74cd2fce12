"""Admission and deferral as functions: a ledger and placement on fakeredis (the same Lua as Redis), no worker."""

from __future__ import annotations

import time

import fakeredis
import pytest

from hypha_celery import keys
from hypha_celery.config import AdmissionConfig
from hypha_celery.errors import (
    AdmissionTimeout,
    DuplicateTask,
    InsufficientCapabilities,
    NotHere,
    ResourcesBusy,
)
from hypha_celery.resources.ledger import Capacity, Lease, Ledger
from hypha_celery.resources.placement import Choice, Placement
from hypha_celery.resources.requirements import Requirements
from hypha_celery.stages.admission import admit, backoff, plan_deferral

GiB = 2**30
CONFIG = AdmissionConfig(backoff_initial=1.0, backoff_max=8.0, max_wait=60.0)


def node(client: fakeredis.FakeRedis, name: str, memory: int, cores: int = 2) -> Ledger:
    """A node with one live worker, ``w-<name>``."""
    ledger = Ledger(client, name, ttl=60)
    ledger.set_capacity(Capacity(cores=list(range(cores)), memory=memory))
    client.zadd(keys.node_workers(name), {f"w-{name}": time.time() + 60})
    return ledger


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_a_request_that_fits_gets_a_lease_held_in_the_ledger(client: fakeredis.FakeRedis) -> None:
    # Given a node with 8 GiB
    here = node(client, "here", 8 * GiB)
    # When a task asks for 2 GiB
    lease = admit(here, Placement(client), Requirements(memory=2 * GiB), task_id="t1", holder="w/t1", worker_id="w-here")
    # Then it holds a lease and the ledger counts it
    assert isinstance(lease, Lease) and lease.memory == 2 * GiB
    assert here.usage().memory_used == 2 * GiB


def test_a_request_that_fits_later_is_busy(client: fakeredis.FakeRedis) -> None:
    # Given a node whose memory is taken
    here = node(client, "here", 8 * GiB)
    here.reserve(Requirements(memory=7 * GiB), holder="other")
    # When a task asks for 2 GiB, Then it is busy (wait), not infeasible
    with pytest.raises(ResourcesBusy) as caught:
        admit(here, Placement(client), Requirements(memory=2 * GiB), task_id="t1", holder="w/t1", worker_id="w-here")
    assert not isinstance(caught.value, AdmissionTimeout)


def test_a_request_too_big_here_names_the_live_node_that_fits(client: fakeredis.FakeRedis) -> None:
    # Given a small node here and a big one elsewhere
    here = node(client, "here", 4 * GiB)
    node(client, "big", 64 * GiB)
    # When a task asks for more than this node has
    with pytest.raises(NotHere) as caught:
        admit(here, Placement(client), Requirements(memory=16 * GiB), task_id="t1", holder="w/t1", worker_id="w-here")
    # Then it is forwarded to the big node's worker queue
    assert caught.value.queue == keys.worker_queue("w-big")


def test_a_request_no_live_node_can_fit_is_infeasible_with_the_largest_seen(client: fakeredis.FakeRedis) -> None:
    # Given two nodes of at most 16 GiB
    here = node(client, "here", 4 * GiB)
    node(client, "other", 16 * GiB)
    # When a task asks for 100 GiB, Then it fails at once, naming what the largest worker has
    with pytest.raises(InsufficientCapabilities, match=r"largest seen has .*memory 16 GiB"):
        admit(here, Placement(client), Requirements(memory=100 * GiB), task_id="t1", holder="w/t1", worker_id="w-here")


def test_a_second_delivery_of_a_running_task_is_a_duplicate(client: fakeredis.FakeRedis) -> None:
    # Given a task that holds a lease
    here = node(client, "here", 8 * GiB)
    placement = Placement(client)
    first = admit(here, placement, Requirements(memory=GiB), task_id="t1", holder="w/t1", worker_id="w-here")
    # When the same task id is admitted again
    with pytest.raises(DuplicateTask) as caught:
        admit(here, placement, Requirements(memory=GiB), task_id="t1", holder="w/t1", worker_id="w-here")
    # Then the refusal names the lease that runs it, and nothing more is reserved
    assert caught.value.lease_id == first.id
    assert here.usage().memory_used == GiB


@pytest.mark.parametrize(("attempt", "rand", "expected"), [(0, 0.0, 0.5), (0, 1.0, 1.0), (2, 0.0, 2.0), (10, 1.0, 8.0)])
def test_backoff_doubles_with_jitter_up_to_the_cap(attempt: int, rand: float, expected: float) -> None:
    # initial 1 s, cap 8 s: initial * 2**attempt, capped, times [0.5, 1)
    assert backoff(attempt, CONFIG, rand=lambda: rand) == pytest.approx(expected)


def test_a_busy_task_past_the_bound_times_out(client: fakeredis.FakeRedis) -> None:
    # Given a task first seen 61 s ago with max_wait 60 s
    with pytest.raises(AdmissionTimeout, match="max_wait = 60s"):
        plan_deferral(CONFIG, Placement(client), Requirements(memory=GiB), ResourcesBusy("full"), node_id="here",
                      worker_id="w-here", attempt=5, first_seen=1000.0, now=1061.0)


def test_a_busy_task_goes_to_a_node_with_room_now_soon(client: fakeredis.FakeRedis) -> None:
    # Given this node full and another with room
    node(client, "here", 8 * GiB).reserve(Requirements(memory=8 * GiB), holder="other")
    node(client, "roomy", 8 * GiB)
    # When a busy task is deferred on its 4th attempt
    deferral = plan_deferral(CONFIG, Placement(client), Requirements(memory=GiB), ResourcesBusy("full"), node_id="here",
                             worker_id="w-here", attempt=3, first_seen=1000.0, now=1010.0, rand=lambda: 0.99)
    # Then it goes to the roomy node's queue within backoff_initial, not after the long backoff
    assert deferral.queue == keys.worker_queue("w-roomy")
    assert deferral.countdown <= CONFIG.backoff_initial
    assert (deferral.attempt, deferral.waited) == (4, 10.0)


def test_a_busy_task_with_nowhere_to_go_backs_off_in_its_own_queue(client: fakeredis.FakeRedis) -> None:
    # Given the only node is full
    node(client, "here", 8 * GiB).reserve(Requirements(memory=8 * GiB), holder="other")
    # When a busy task is deferred on its 3rd attempt
    deferral = plan_deferral(CONFIG, Placement(client), Requirements(memory=GiB), ResourcesBusy("full"), node_id="here",
                             worker_id="w-here", attempt=2, first_seen=1000.0, now=1001.0, rand=lambda: 0.0)
    # Then it goes back to the queue it came from after the backoff for that attempt
    assert deferral.queue is None
    assert deferral.countdown == pytest.approx(2.0)


def test_a_task_not_here_is_forwarded_at_once_then_with_backoff(client: fakeredis.FakeRedis) -> None:
    # Given a task that only another node can fit
    reason = NotHere("too big here", Choice(node="big", worker="w-big").queue)
    placement = Placement(client)
    # When it is deferred the first time, Then it goes to that node at once
    first = plan_deferral(CONFIG, placement, Requirements(memory=GiB), reason, node_id="here", worker_id="w-here",
                          attempt=0, first_seen=1000.0, now=1000.0)
    assert (first.queue, first.countdown) == (keys.worker_queue("w-big"), 0.0)
    # When it bounces back, Then it waits so that two nodes cannot bounce it quickly
    again = plan_deferral(CONFIG, placement, Requirements(memory=GiB), reason, node_id="here", worker_id="w-here",
                          attempt=1, first_seen=1000.0, now=1000.5, rand=lambda: 0.0)
    assert again.countdown == pytest.approx(0.5)
