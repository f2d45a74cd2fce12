"""Celery's Redis result backend, storing a task's states in fewer round trips and carrying its lease in them.

Celery stores a task state in two round trips: a ``GET`` of the stored meta (a stored ``SUCCESS`` is
never overwritten), then a ``MULTI`` / ``SETEX`` / ``PUBLISH`` / ``EXEC`` transaction. Where results
are JSON (hypha's settings), :class:`ResultBackend` does both in one: ``store_state.lua`` reads the
stored status and writes the new state in one atomic step (so the rule also holds against a write
that lands between Celery's read and its write). The keys, values, expiry and published message are
Celery's own; a stored meta that is not JSON is left to Celery's own read and write (a ``STARTED``
stored with a reservation is then only logged as not stored: the reservation took, and the task's
later states tell).

When the node's ledger lives on the same Redis server (host, port, database and user: the default,
where the registry URL is the result backend's), the ledger's scripts ride in those same calls: the
state script and the ledger's run as one script (:func:`hypha_celery.lua.composed`, each part on its own
keys, what a ``MULTI`` of the two would do), so the ledger costs no round trip of its own:

* the **reservation** travels with ``STARTED``, which hypha tasks store themselves once they are
  verified and validated (:func:`started_with`, :meth:`ResultBackend.store_started`). It is the same
  Lua script, so still one atomic, all-or-nothing step before any ML work;
* the **release** travels with the result (:func:`release_with_result`), so the lease is freed in the
  same atomic step that stores the result (the task guard says "done" exactly when the result is
  there to say so).

Exactness is kept:

* the lease stays renewed until the result store begins, so it is never reaped while the task runs;
* the release runs even where the state cannot be stored (a Redis error in the state's part);
* where the store cannot carry the release (the ledger is elsewhere, a Redis Cluster, results that
  are not JSON, the result is ignored) or the call fails,
  the release is handed to the process's :class:`~hypha_celery.resources.ledger.LeaseKeeper`, which
  gives it back moments later in its own call, as it did every release before; ``task_postrun``
  settles any release no store carried;
* a ``STARTED`` call that fails is sent again as two calls; the reservation, sent twice with
  one lease id, takes once (``reserve.lua``);
* a worker killed -9 leaves leases nobody renews: they expire by themselves.

The worker selects this class for ``redis://`` and ``rediss://`` result backends at
``celeryd_init`` (through the loader's backend aliases, :func:`backend_aliases`); schedulers and
other clients keep Celery's own class, and nothing in a stored result differs.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import states
from celery.app.task import Context, Task, get_actual_ignore_result
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import ResponseError

from hypha_celery import lua
from hypha_celery.resources.ledger import Call, Lease, LeaseKeeper, Ledger

__all__ = ["BACKEND", "RELEASE", "Release", "ResultBackend", "backend_aliases", "mark_started", "release_with_result",
           "settle_release", "started_with"]

log = logging.getLogger(__name__)

BACKEND = "hypha_celery.worker.backend:ResultBackend"
RELEASE = "hypha_release"  # the request attribute that carries a task's Release to its result store
_SAME_SERVER = ("host", "port", "path", "db", "username")  # connection kwargs that name one server and identity


@dataclass
class Release:
    """Leases a task gives back with its result: in the store's own script call, else by the keeper."""

    keeper: LeaseKeeper
    leases: list[Lease]
    settled: bool = field(default=False)

    def call(self) -> Call:
        return self.keeper.ledger.release_call(*self.leases)

    def begin(self) -> None:
        """The store is about to carry the release: stop renewing (a renewal after it would take the lease back)."""
        for lease in self.leases:
            self.keeper.discard(lease)

    def carried(self) -> None:
        self.settled = True

    def fallback(self) -> None:
        """Give the leases back through the keeper (its own call, moments later), unless the store did."""
        if self.settled:
            return
        self.settled = True
        for lease in self.leases:
            self.keeper.release(lease)


def release_with_result(task: Task, keeper: LeaseKeeper, lease: Lease) -> None:
    """Give ``lease`` back with the task's result store when that store can carry it, else through the keeper now."""
    request = task.request
    backend = task.backend
    if (
        isinstance(backend, ResultBackend)
        and not request.called_directly
        and not get_actual_ignore_result(task, request)
        and backend.carries(keeper.ledger)
    ):
        pending = getattr(request, RELEASE, None)
        if isinstance(pending, Release) and not pending.settled:
            pending.leases.append(lease)
        else:
            setattr(request, RELEASE, Release(keeper, [lease]))
        return
    keeper.release(lease)


def started_with(task: Task, ledger: Ledger) -> Callable[[Call], Any] | None:
    """How the task's reservation travels with its ``STARTED`` state write (a ``via`` for :meth:`Ledger.try_reserve`).

    Hypha tasks do not let Celery store ``STARTED`` before they run (``HyphaTask.track_started``): it is
    stored here, after the task was verified and validated. Where the backend carries ``ledger``, the
    reservation rides in that write's script call (returned, to be handed to the ledger); else the
    state is stored now, on its own, and None is returned. Nothing is stored where Celery would not
    track it (``task_track_started`` off, an ignored result, a task called eagerly).
    """
    request = task.request
    if (
        request.called_directly
        or request.is_eager
        or get_actual_ignore_result(task, request)
        or not task.app.conf.task_track_started
    ):
        return None
    backend = task.backend
    if isinstance(backend, ResultBackend) and backend.carries(ledger):
        return functools.partial(backend.store_started, request.id, request)
    backend.store_result(request.id, _started_meta(request), states.STARTED, request=request)
    return None


def mark_started(task: Task) -> None:
    """Store ``STARTED`` for a task that reserves nothing, where Celery would track it."""
    request = task.request
    if request.called_directly or request.is_eager or get_actual_ignore_result(task, request):
        return
    if task.app.conf.task_track_started:
        task.backend.store_result(request.id, _started_meta(request), states.STARTED, request=request)


def _started_meta(request: Context) -> dict[str, Any]:
    """What Celery stores with ``STARTED``: the process and the worker."""
    return {"pid": os.getpid(), "hostname": request.hostname}


def settle_release(request: Context | None) -> None:
    """After the task's stores (``task_postrun``): a release no store carried goes through the keeper."""
    pending = getattr(request, RELEASE, None) if request is not None else None
    if isinstance(pending, Release):
        pending.fallback()


def backend_aliases(aliases: dict[str, str] | None) -> dict[str, str]:
    """Celery's backend aliases with ``redis`` and ``rediss`` pointing here (an alias the operator set is kept)."""
    chosen = dict(aliases or {})
    for scheme in ("redis", "rediss"):
        chosen.setdefault(scheme, BACKEND)
    return chosen


class ResultBackend(RedisBackend):
    """Celery's Redis result backend: one round trip per state stored, with the task's lease scripts riding along."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._store = lua.script("store_state")

    @property
    def scripted(self) -> bool:
        """Whether states are stored by ``store_state.lua``: it reads the stored status, so results must be plain
        JSON (not compressed, ``result_compression``, where Celery has it)."""
        return self.serializer == "json" and not getattr(self, "compression", None)

    def carries(self, ledger: Ledger) -> bool:
        """Whether ``ledger``'s scripts can ride in this backend's state writes: same server, database and user."""
        if not self.scripted or not isinstance(ledger.redis, redis.Redis):  # a Cluster client: keys on any node
            return False
        pool = ledger.redis.connection_pool
        mine = self.client.connection_pool
        if pool.connection_class is not mine.connection_class:
            return False
        theirs, ours = pool.connection_kwargs, mine.connection_kwargs
        return all(theirs.get(name) == ours.get(name) for name in _SAME_SERVER)

    def store_started(self, task_id: str, request: Context, call: Call) -> Any:
        """Store ``STARTED`` as Celery does, with ``call`` (the ledger's reservation) in the same step.

        Returns the call's reply. As in Celery, a stored ``SUCCESS`` is never overwritten (the call still
        runs); a step that fails stores the state and runs the call each on its own (a server that has not
        loaded the scripts yet gets them loaded and run).
        """
        key, value = self.get_key_for_task(task_id), self.encode(self._meta(task_id, _started_meta(request),
                                                                            states.STARTED, None, request))
        both = lua.composed(self._store, call.script)
        try:
            stored, reply = lua.replies(both(self.client, *lua.composed_args([key], [value, self.expires or 0],
                                                                             call.keys, call.args)))
        except redis.RedisError as exc:
            log.warning("task %s: storing STARTED with its reservation failed (%s: %s); doing each on its own",
                        task_id, type(exc).__name__, exc)
            self.store_result(task_id, _started_meta(request), states.STARTED, request=request)
            return call.script(self.client, call.keys, call.args)  # the same lease id: never taken twice
        if isinstance(stored, Exception):  # the reservation took: the task runs, its later states tell
            log.warning("task %s: could not store STARTED (%s)", task_id, stored)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        """Celery's store of a state, in one round trip; a release waiting on the request rides in it."""
        if not self.scripted:
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        value = self.encode(self._meta(task_id, result, state, traceback, request))
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        # Celery 5.7 keeps failures result_failure_expires; older releases keep every state result_expires
        expires = (getattr(self, "failure_expires", self.expires) if state == states.FAILURE else self.expires) or 0
        pending = getattr(request, RELEASE, None) if request is not None else None
        if not isinstance(pending, Release) or pending.settled:
            pending = None
        if pending is not None:
            pending.begin()
        try:
            stored = self.ensure(self._write, (self.get_key_for_task(task_id), value, expires, pending))
        except Exception as exc:
            if pending is not None:
                lease = "was given back with it" if pending.settled else "is given back separately"
                log.warning("task %s: storing its %s result failed (%s: %s); its lease %s",
                            task_id, state, type(exc).__name__, exc, lease)
            raise
        finally:
            if pending is not None:
                pending.fallback()  # nothing if the store carried it
        if _not_json(stored):  # a meta stored by something else: Celery's own read and write decide
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        return result

    def _meta(self, task_id: str, result: Any, state: str, traceback: Any, request: Any) -> dict[str, Any]:
        """The meta Celery stores for this state (its own builder: extended results included)."""
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        return meta

    def _write(self, key: str, value: Any, expires: int, pending: Release | None) -> Any:
        """``store_state.lua``'s reply (or its error, when the stored meta is not JSON); ``pending`` rides along.

        The release runs in the same script call even when the state cannot be stored, so a failed store
        still gives the lease back. A retry after a lost reply sends the release again, which frees nothing
        twice (``release.lua`` frees only what is still held).
        """
        if pending is None or pending.settled:
            try:
                return self._store(self.client, [key], [value, expires])
            except ResponseError as exc:
                if _not_json(exc):
                    return exc
                raise
        release = pending.call()
        both = lua.composed(self._store, release.script)
        stored, released = lua.replies(both(self.client, *lua.composed_args([key], [value, expires],
                                                                            release.keys, release.args)))
        if isinstance(released, Exception):
            log.info("the result store could not carry the lease release (%s); releasing separately", released)
            pending.fallback()
        else:
            pending.carried()
        if isinstance(stored, Exception) and not _not_json(stored):
            raise stored
        return stored


def _not_json(reply: Any) -> bool:
    """``store_state.lua`` refused: the meta stored under the key is not JSON (so not Celery's JSON result)."""
    return isinstance(reply, ResponseError) and str(reply).startswith("HYPHA_NOT_JSON")
