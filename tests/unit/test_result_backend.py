"""When the result store can carry a lease release, and who releases it when it cannot (no Redis needed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.app.task import Context
from celery.backends.redis import RedisBackend

from hypha_celery.redis_client import registry_client
from hypha_celery.resources.ledger import Lease, Ledger
from hypha_celery.worker.backend import (
    BACKEND,
    RELEASE,
    Release,
    ResultBackend,
    backend_aliases,
    release_with_result,
    settle_release,
    started_with,
)

URL = "redis://127.0.0.1:6390/0"  # nothing listens: building clients opens no connection


class Keeper:
    """Records what a LeaseKeeper was asked to do."""

    def __init__(self, url: str = URL) -> None:
        self.ledger = Ledger(redis.Redis.from_url(url), "n")
        self.released: list[str] = []
        self.discarded: list[str] = []

    def release(self, lease: Lease) -> None:
        self.released.append(lease.id)

    def discard(self, lease: Lease) -> None:
        self.discarded.append(lease.id)


def lease(lease_id: str = "l1") -> Lease:
    return Lease(id=lease_id, node="n", memory=1, cores={}, gpus={}, exclusive_gpu=False, task_id="t1")


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("backend-test", set_as_current=False, broker="memory://", backend=URL)
    app.loader.override_backends = backend_aliases(app.loader.override_backends)
    yield app
    app.close()


@pytest.mark.parametrize(
    ("ledger_url", "carries"),
    [
        (URL, True),
        ("redis://127.0.0.1:6390/1", False),  # another database: the script call runs in the backend's
        ("redis://127.0.0.1:6391/0", False),  # another server
        ("redis://localhost:6390/0", False),  # maybe the same server: not assumed
        ("redis://other:secret@127.0.0.1:6390/0", False),  # another user may have other rights
        ("redis://127.0.0.1:6390/0?cluster=true", False),  # a Redis Cluster client
    ],
)
def test_the_store_carries_a_release_only_to_its_own_server_database_and_user(
    app: Celery, ledger_url: str, carries: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYPHA_KEY_PREFIX", "{hypha}")  # what a cluster registry needs
    # Given the worker's backend (selected through the loader's aliases) and a ledger at ledger_url
    backend = app.backend
    assert isinstance(backend, ResultBackend)
    ledger = Ledger(registry_client(ledger_url), "n")
    # Then the backend carries the ledger's release only where the one script call reaches the ledger's keys
    assert backend.carries(ledger) is carries


def test_an_operator_alias_is_kept() -> None:
    assert backend_aliases({"redis": "my.Backend"}) == {"redis": "my.Backend", "rediss": BACKEND}


def test_a_task_on_a_plain_backend_releases_through_the_keeper(app: Celery) -> None:
    # Given a task whose backend is Celery's own class (a scheduler's app, an operator's alias)
    app.loader.override_backends = {}

    @app.task(name="t", bind=True, shared=False)
    def probe(self: Any) -> None: ...

    assert type(app.backend) is RedisBackend
    probe.push_request(id="t1", called_directly=False)
    keeper = Keeper()
    # When its lease is handed over at the end of its body
    release_with_result(probe, keeper, lease())  # type: ignore[arg-type]
    # Then the keeper releases it at once and nothing waits on the request
    assert keeper.released == ["l1"] and getattr(probe.request, RELEASE, None) is None
    probe.pop_request()


@pytest.mark.parametrize("ignore_result", [False, True])
def test_a_release_waits_for_the_store_only_when_a_result_is_stored(app: Celery, ignore_result: bool) -> None:
    @app.task(name="t", bind=True, shared=False)
    def probe(self: Any) -> None: ...

    probe.push_request(id="t1", called_directly=False, ignore_result=ignore_result)
    keeper = Keeper()
    release_with_result(probe, keeper, lease())  # type: ignore[arg-type]
    pending = getattr(probe.request, RELEASE, None)
    if ignore_result:  # no store will come: released now
        assert keeper.released == ["l1"] and pending is None
    else:  # it rides with the store
        assert keeper.released == [] and isinstance(pending, Release) and pending.leases == [lease()]
    probe.pop_request()


def test_a_release_no_store_carried_goes_through_the_keeper_once() -> None:
    # Given a release waiting on a request, and the task ended without storing a result that carried it
    keeper = Keeper()
    pending = Release(keeper, [lease()])  # type: ignore[arg-type]
    request = type("Request", (), {RELEASE: pending})()
    # When task_postrun settles it (twice: settling is idempotent)
    settle_release(request)
    settle_release(request)
    # Then the keeper releases it, once
    assert keeper.released == ["l1"]


def test_a_carried_release_is_not_released_again() -> None:
    keeper = Keeper()
    pending = Release(keeper, [lease()])  # type: ignore[arg-type]
    pending.begin()
    pending.carried()
    pending.fallback()
    # the store carried it: the keeper stopped renewing it and releases nothing
    assert keeper.discarded == ["l1"] and keeper.released == []


@pytest.mark.parametrize(("carrying", "tracked"), [(True, True), (False, True), (True, False)])
def test_started_is_stored_with_the_reservation_or_before_it(
    app: Celery, monkeypatch: pytest.MonkeyPatch, carrying: bool, tracked: bool
) -> None:
    # Given a hypha-like task (Celery does not store its STARTED) and a worker that tracks STARTED or not
    app.conf.task_track_started = tracked

    @app.task(name="t", bind=True, shared=False, track_started=False)
    def probe(self: Any) -> None: ...

    stored: list[str] = []
    monkeypatch.setattr(ResultBackend, "store_result", lambda self, task_id, meta, state, **_: stored.append(state))
    probe.push_request(id="t1", hostname="w@host", called_directly=False, is_eager=False)
    ledger = Keeper(URL if carrying else "redis://127.0.0.1:6391/0").ledger
    # When its reservation is about to be made
    via = started_with(probe, ledger)
    probe.pop_request()
    if not tracked:  # Then nothing is stored where Celery would not track STARTED, and the ledger reserves alone
        assert via is None and stored == []
    elif carrying:  # ... the reservation rides with the STARTED write, which has not happened yet
        assert via is not None and stored == []
    else:  # ... or STARTED is stored now, on its own, and the ledger reserves alone
        assert via is None and stored == ["STARTED"]


def test_results_that_are_not_json_are_stored_by_celery_and_carry_nothing(app: Celery) -> None:
    # Given a worker whose results are serialized as pickle (the state script reads JSON only)
    app.conf.result_serializer = "pickle"
    app.conf.result_accept_content = ["pickle", "json"]
    backend = app.backend
    # Then its states go through Celery's own read and write, and no lease rides with them
    assert isinstance(backend, ResultBackend) and not backend.scripted
    assert backend.carries(Keeper().ledger) is False


def test_compressed_results_are_stored_by_celery(app: Celery) -> None:
    # Given results compressed (result_compression): the stored meta is no longer JSON the state script can read
    app.conf.result_compression = "zlib"
    # Then Celery's own read and write store them, and no lease rides along
    assert not app.backend.scripted and app.backend.carries(Keeper().ledger) is False


def test_a_result_store_that_fails_hands_its_release_to_the_keeper(
    app: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a task's release waiting on its result store, and a Redis whose script calls fail (no retries left)
    app.conf.result_backend_transport_options = {"retry_policy": {"max_retries": 0}}
    backend = app.backend

    def dropped(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("connection dropped (test)")

    monkeypatch.setattr(redis.Redis, "evalsha", dropped)
    keeper = Keeper()
    request = Context(id="t1", hostname="w@host")
    setattr(request, RELEASE, Release(keeper, [lease()]))  # type: ignore[arg-type]
    # When the result is stored
    with pytest.raises(redis.ConnectionError):
        backend.store_result("t1", {"output": 1}, "SUCCESS", request=request)
    # Then the failure is logged and the keeper releases the lease at once (it stopped renewing it first)
    assert keeper.discarded == ["l1"] and keeper.released == ["l1"]
    assert "storing its SUCCESS result failed" in caplog.text
