"""A task's lease rides in its state writes' Redis calls (reserved with STARTED, released with the result).

Real ``redis-server``, real workers; Redis' own MONITOR shows which commands travelled together.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery
from celery.app.task import Context

from hypha_celery import lua
from hypha_celery.harness import redis_monitor
from hypha_celery.harness.launch import wait_for
from hypha_celery.resources.ledger import Capacity, Lease, Ledger
from hypha_celery.resources.requirements import Requirements
from hypha_celery.worker.backend import ResultBackend, backend_aliases


def task_leases(ledger: Ledger) -> dict[str, dict]:
    """The node's task leases by task id."""
    return {lease["t"]: lease for lease in ledger.usage().leases if lease.get("k") == "task"}


@contextmanager
def monitored(url: str) -> Iterator[list[tuple[str, str]]]:
    """Every command clients send while inside (scripts' own commands left out), as (client address, command
    line), from Redis' MONITOR; complete once the block has ended."""
    seen: list[tuple[str, str]] = []
    with redis_monitor.monitored(url, timeout=10) as commands:
        yield seen
    seen.extend((f"{c['client_address']}:{c['client_port']}", c["command"]) for c in commands
                if c["client_type"] != "lua")


def transactions(seen: list[tuple[str, str]]) -> tuple[list[list[str]], list[str]]:
    """The MULTI ... EXEC blocks (each a list of command lines) and the commands sent outside any."""
    open_blocks: dict[str, list[str]] = {}
    blocks: list[list[str]] = []
    alone: list[str] = []
    for source, line in seen:
        name = line.split(" ", 1)[0].strip('"').lower()
        if name == "multi":
            open_blocks[source] = []
        elif name in ("exec", "discard") and source in open_blocks:
            blocks.append(open_blocks.pop(source))
        elif source in open_blocks:
            open_blocks[source].append(line)
        else:
            alone.append(line)
    return blocks, alone


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_the_lease_travels_with_the_task_states(start_worker, celery_client, redis_client, redis_url, pool) -> None:
    # Given a worker whose ledger shares the result backend's Redis (the default: the registry URL is the backend's)
    start_worker({"resources": {"node_id": "ride"}}, args=("--pool", pool, "--concurrency", "2"))
    ledger = Ledger(redis_client, "ride")
    app = celery_client()
    warm = app.send_task("hypha.noop", kwargs={})
    warm.get(timeout=30)  # the first calls load the scripts into the server (not counted below)
    wait_for(lambda: warm.id not in task_leases(ledger), 5, "the first lease to be released")
    state, reserve, release = lua.script("store_state"), lua.script("reserve", prelude=True), lua.script(
        "release", prelude=True)
    with_reserve, with_release = lua.composed(state, reserve).sha, lua.composed(state, release).sha
    # When no-op tasks run while MONITOR records every command
    with monitored(redis_url) as seen:
        results = [app.send_task("hypha.noop", kwargs={"requirements": {"cpu_cores": 0.1}}) for _ in range(5)]
        for result in results:
            result.get(timeout=30)
            # Then the moment a result is visible its lease is gone: both happened in one atomic step
            assert result.id not in task_leases(ledger)
    blocks, alone = transactions(seen)
    for result in results:
        mine = [line for line in alone if result.id in line]
        # ... the reservation ran in the one call that stored STARTED, the release in the result's
        [started] = [line for line in mine if "STARTED" in line]
        [stored] = [line for line in mine if "SUCCESS" in line]
        assert with_reserve in started and with_release in stored, (started, stored)
        # ... and no state of theirs went in a transaction, no reservation or release of theirs on its own
        assert not [block for block in blocks if any(f"celery-task-meta-{result.id}" in line for line in block)]
        assert not [line for line in mine if reserve.sha in line or release.sha in line]


def _as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


def test_a_failed_result_store_still_releases_the_lease(start_worker, celery_client, redis_client, redis_url) -> None:
    # Given a worker whose results and ledger both go through the Redis user "results" (so the release rides along)
    redis_client.acl_setuser("results", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
                             commands=["+@all"])
    try:
        url = _as_user(redis_url, "results", "secret")
        # (lease_heartbeat 10 s: a lease nobody released would live 20 s, so a release is not mistaken for expiry)
        worker = start_worker({"resources": {"node_id": "nostore", "lease_heartbeat": 10}}, backend=url,
                              env={"HYPHA_REGISTRY_URL": url})
        ledger = Ledger(redis_client, "nostore")
        app = celery_client()
        result = app.send_task("hypha.noop", kwargs={"hold_s": 3})
        wait_for(lambda: result.id in task_leases(ledger) and result.state == "STARTED", 30, "the task to hold its lease")
        # When that user loses the right to store results (Celery stores them with SETEX) while the task runs
        redis_client.acl_setuser("results", commands=["-setex"])
        # Then the task's result store fails when it ends (the state script may not run SETEX) ...
        wait_for(lambda: "storing its SUCCESS result failed" in worker.output(), 30, "the failed store")
        assert "can't run this command" in worker.output() or "no permissions" in worker.output()  # Redis 6 / 7
        # ... and its lease is given back all the same (the release in the same script call ran), not left to expire
        wait_for(lambda: result.id not in task_leases(ledger), 5, "the lease to be released")
        assert result.state == "STARTED"
    finally:
        redis_client.acl_deluser("results")


def test_a_worker_killed_9_loses_its_lease_by_expiry(start_worker, celery_client, redis_client) -> None:
    # Given a worker holding a task's lease (lease_heartbeat 1 s: the lease lives 2 s past its last renewal)
    worker = start_worker({"resources": {"node_id": "killed"}})
    ledger = Ledger(redis_client, "killed")
    app = celery_client()
    result = app.send_task("hypha.noop", kwargs={"hold_s": 30})
    wait_for(lambda: result.id in task_leases(ledger), 30, "the task to hold its lease")
    # When the worker is killed -9: no result is stored, so no release rides anywhere
    worker.kill9()
    seconds, micros = redis_client.time()
    killed_ms = seconds * 1000 + micros // 1000
    lease = task_leases(ledger)[result.id]
    # Then the lease, renewed no more, expires within 2 x heartbeat of the kill and is reaped
    assert lease["e"] - killed_ms <= 2 * 1000
    wait_for(lambda: result.id not in task_leases(ledger), 10, "the lease to expire")


@contextmanager
def backend_on(url: str) -> Iterator[ResultBackend]:
    """The worker's result backend class, in this process, on the Redis of ``url``."""
    app = Celery("round-trips", set_as_current=False, broker="memory://", backend=url)
    app.loader.override_backends = backend_aliases(app.loader.override_backends)
    assert isinstance(app.backend, ResultBackend)
    yield app.backend
    app.backend.client.connection_pool.disconnect()
    app.close()


@pytest.fixture
def backend(redis_url: str) -> Iterator[ResultBackend]:
    """The worker's result backend, on the test Redis."""
    with backend_on(redis_url) as on_test_redis:
        yield on_test_redis


def _node(redis_url: str, node: str) -> Ledger:
    ledger = Ledger(redis.Redis.from_url(redis_url), node)
    ledger.set_capacity(Capacity(cores=[0, 1], memory=2**30))
    return ledger


def test_a_server_without_the_script_still_reserves_once(own_redis, own_redis_url) -> None:
    # Given a Redis that has not loaded the ledger's scripts (new or restarted); a server of the module's own, as
    # SCRIPT FLUSH empties every database's scripts and parallel tests on the shared one would lose theirs
    ledger = _node(own_redis_url, "fresh")
    own_redis.script_flush()
    request = Context(id="t-fresh", hostname="w@host")
    # When a reservation rides with the STARTED write there
    with backend_on(own_redis_url) as backend:
        lease = ledger.try_reserve(Requirements(cpu_milli=1000, memory=2**20), holder="w", task_id="t-fresh",
                                   via=functools.partial(backend.store_started, "t-fresh", request))
        # Then STARTED is stored, and the script is loaded and run: one lease
        assert isinstance(lease, Lease) and backend.get_task_meta("t-fresh")["status"] == "STARTED"
        assert [held["id"] for held in ledger.usage().leases] == [lease.id]


def test_a_failed_started_call_reserves_on_its_own(backend, redis_client, redis_url, monkeypatch) -> None:
    # Given a STARTED call whose reply is lost: Redis ran it, then the connection dropped
    ledger = _node(redis_url, "dropped")
    both = lua.composed(lua.script("store_state"), lua.script("reserve", prelude=True))
    evalsha = redis.Redis.evalsha
    lost: list[Any] = []

    def reply_lost(self: Any, sha: str, *args: Any) -> Any:
        reply = evalsha(self, sha, *args)
        if sha != both.sha or lost:
            return reply
        lost.append(reply)
        raise redis.ConnectionError("connection dropped (test)")

    monkeypatch.setattr(redis.Redis, "evalsha", reply_lost)
    request = Context(id="t-dropped", hostname="w@host")
    # When a task reserves with it
    lease = ledger.try_reserve(Requirements(cpu_milli=1000, memory=2**20), holder="w", task_id="t-dropped",
                               via=functools.partial(backend.store_started, "t-dropped", request))
    # Then the state and the reservation are sent again, each on its own: STARTED stored, and the second
    # reservation answers with the lease the first took (one lease, the memory counted once)
    assert lost and isinstance(lease, Lease) and backend.get_task_meta("t-dropped")["status"] == "STARTED"
    assert [held["id"] for held in ledger.usage().leases] == [lease.id] and ledger.usage().memory_used == 2**20


def test_a_state_is_stored_in_one_round_trip_and_a_success_is_never_overwritten(backend, redis_url) -> None:
    # Given the worker's backend on a real Redis
    request = Context(id="t-once", hostname="w@host")
    key = backend.get_key_for_task("t-once").decode()
    backend.store_result("t-warm", {}, "PROGRESS", request=Context(id="t-warm"))  # the server loads the script
    # When it stores PROGRESS and then SUCCESS while MONITOR records every command
    with monitored(redis_url) as seen:
        backend.store_result("t-once", {"step": 1}, "PROGRESS", request=request)
        backend.store_result("t-once", {"output": 42}, "SUCCESS", request=request)
    # Then each state took one command, the state script (Celery sends a GET of the meta before each write)
    sent = [line for _, line in seen if key in line]
    assert [line.split(" ", 1)[0].strip('"').lower() for line in sent] == ["evalsha", "evalsha"], sent
    assert backend.get_task_meta("t-once")["result"] == {"output": 42}
    # ... and, as in Celery, a stored SUCCESS is kept when a later state arrives (a redelivered copy's)
    backend.store_result("t-once", {"step": 2}, "PROGRESS", request=request)
    backend.mark_as_failure("t-once", RuntimeError("late copy"), request=request)
    assert backend.get_task_meta("t-once")["status"] == "SUCCESS"


def test_a_reservation_still_takes_when_a_success_is_stored(backend, redis_url) -> None:
    # Given a task whose SUCCESS is already stored
    ledger = _node(redis_url, "done-before")
    request = Context(id="t-done", hostname="w@host")
    backend.store_result("t-done", {"output": 1}, "SUCCESS", request=request)
    # When a reservation rides with its STARTED write
    lease = ledger.try_reserve(Requirements(cpu_milli=1000, memory=2**20), holder="w", task_id="t-done",
                               via=functools.partial(backend.store_started, "t-done", request))
    # Then the reservation answers as it would alone, and SUCCESS stays
    assert isinstance(lease, Lease) and backend.get_task_meta("t-done")["status"] == "SUCCESS"


def test_a_stored_meta_that_is_not_json_is_left_to_celery(backend, redis_client, redis_url) -> None:
    # Given a key holding something that is not JSON (not a result this backend wrote)
    key = backend.get_key_for_task("t-odd")
    redis_client.set(key, b"\x80not json")
    celery_own = Celery("plain", set_as_current=False, broker="memory://", backend=redis_url).backend
    # When the worker's backend stores a state there, Then it does what Celery's own class does: refuses to decode
    with pytest.raises(Exception) as ours:
        backend.store_result("t-odd", {"step": 1}, "PROGRESS", request=Context(id="t-odd"))
    with pytest.raises(Exception) as theirs:
        celery_own.store_result("t-odd", {"step": 1}, "PROGRESS", request=Context(id="t-odd"))
    assert type(ours.value) is type(theirs.value)
    assert redis_client.get(key) == b"\x80not json"


def test_a_stored_success_is_kept_from_its_prefix_alone(backend, redis_client) -> None:
    # Given a stored SUCCESS whose result the Redis server would have to decode (here: cut off, so it cannot)
    key = backend.get_key_for_task("t-big")
    redis_client.set(key, '{"status": "SUCCESS", "result": [1, 2, 3')
    # When a late copy stores PROGRESS, Then Celery's meta prefix settles it: kept, nothing decoded, no error
    backend.store_result("t-big", {"step": 1}, "PROGRESS", request=Context(id="t-big"))
    assert redis_client.get(key) == b'{"status": "SUCCESS", "result": [1, 2, 3'


def test_failures_are_kept_for_result_expires_where_celery_has_no_failure_expiry(backend, redis_client,
                                                                                 monkeypatch) -> None:
    # Given a Celery release before result_failure_expires (5.4-5.6: every state is kept result_expires)
    monkeypatch.delattr(backend, "failure_expires")
    # When a failure is stored, Then it is, with result_expires
    backend.mark_as_failure("t-failed", RuntimeError("boom"), request=Context(id="t-failed"))
    assert backend.get_task_meta("t-failed")["status"] == "FAILURE"
    assert 0 < redis_client.ttl(backend.get_key_for_task("t-failed")) <= backend.expires


def test_a_composed_script_runs_each_part_on_its_own_keys_and_the_second_after_a_failed_first(redis_client) -> None:
    # Given two scripts: one that writes its key or fails on request, one that echoes its keys and arguments
    first = lua.Script.of("first", """
local KEY = KEYS[1]
local MODE = ARGV[1]
if MODE == 'raise' then redis.call('INCR', 'not-a-number') end
if MODE == 'error' then return redis.error_reply('REFUSED by the first part') end
if MODE == 'nil' then return nil end
redis.call('SET', KEY, MODE)
return 1
""")
    second = lua.Script.of("second", "return {KEYS[1], KEYS[2], ARGV[1]}")
    redis_client.set("not-a-number", "x")
    both = lua.composed(first, second)

    def run(mode: str) -> tuple[Any, Any]:
        return lua.replies(both(redis_client, *lua.composed_args(["k1"], [mode], ["k2", "k3"], ["a2"])))

    # When the first part succeeds, Then each part saw only its own keys and arguments
    assert run("written") == (1, [b"k2", b"k3", b"a2"]) and redis_client.get("k1") == b"written"
    # When the first part returns an error or raises one, Then that is its reply, and the second still ran
    refused, echoed = run("error")
    assert isinstance(refused, redis.ResponseError) and "REFUSED by the first part" in str(refused)
    assert echoed == [b"k2", b"k3", b"a2"]
    raised, echoed = run("raise")
    assert isinstance(raised, redis.ResponseError) and "not an integer" in str(raised)
    assert echoed == [b"k2", b"k3", b"a2"]
    # When the first part returns nothing, Then the reply keeps its shape
    assert run("nil") == (None, [b"k2", b"k3", b"a2"])
