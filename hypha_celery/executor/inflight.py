"""A serving lane's generations in flight: submitted to the executor's running batch, answered by id.

With continuous batching (:func:`~hypha_celery.executor.batching.continuous`) the lane does not
wait for a generation: it submits it (:meth:`~hypha_celery.executor.process.ExecutorProcess.submit`)
and goes on to the next batch, so any number run at once in the executor
(:mod:`hypha_celery.executor.continuous`). That leaves the lane answerable for each of them
apart from any batch: routing its tagged replies (streamed text, then its result) to its task,
its own deadline (past it the row is cancelled in the executor, and an executor that does not end
it is stopped), its task giving up (revoked), and the executor dying under it (sent again alone
when it was one of several, so only the request that killed it fails). That bookkeeping lives
here, apart from the lanes' static batches and the pool (:mod:`hypha_celery.executor.pool`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Protocol

from hypha_celery import errors
from hypha_celery.config import KILL_GRACE_S
from hypha_celery.executor.process import ExecutorProcess, ExecutorSettings, error_from_reply
from hypha_celery.executor.requests import KILLED, GeneratedItem, Request, job_limits
from hypha_celery.protocol import Error, TaggedReply
from hypha_celery.work import Streamed

__all__ = ["InFlight"]

log = logging.getLogger(__name__)


class _Pool(Protocol):
    """What the in-flight generations read of the pool: its settings, and whether it is closing."""

    settings: ExecutorSettings
    closed: bool


class InFlight:
    """The lane's part that keeps submitted generations (a mixin of the lane, on the lane's lock ``cond``)."""

    pool: _Pool
    cond: threading.Condition
    calling: threading.Lock
    # Submitted generations by tag, with the executor running them and, past their deadline, when they were
    # cancelled (an executor that does not end them within the kill grace is stopped).
    inflight: dict[int, tuple[Request, ExecutorProcess]]
    overdue: dict[int, tuple[float, ExecutorProcess]]
    tags: int

    def submit(self, request: Request) -> None:
        raise NotImplementedError  # the lane queues it

    def _ensure_executor(self) -> ExecutorProcess:
        raise NotImplementedError  # the lane starts its executor

    def _cache_changed(self, cache: dict[str, int]) -> None:
        raise NotImplementedError  # the lane reports its cache

    def _submit(self, request: Request) -> None:
        """Send ``request`` to join the executor's running batch; its replies come to :meth:`_tagged`.

        One sent again after its executor died runs alone: the lane waits for it before the next, so a
        request that kills the executor fails alone (as :func:`~hypha_celery.executor.batching.retry_groups`
        does for a batch).
        """
        timeout = request.deadline - time.monotonic()
        if timeout <= 0:
            request.finish(error=errors.TaskTimeout("the task's task_timeout passed while it waited for its model"))
            return
        assert request.generate is not None
        started = time.monotonic()
        with self.calling:
            executor = self._ensure_executor()
        request.deadline += time.monotonic() - started  # as a static batch: the executor's start is not its time
        job = dataclasses.replace(request.generate, limits=job_limits([request.lease], self.pool.settings))
        with self.cond:
            self.tags += 1
            tag = request.tag = self.tags
            self.inflight[tag] = (request, executor)
        try:
            executor.submit(tag, job, lambda reply: self._tagged(tag, reply))
        except errors.HyphaError as exc:
            self._tagged(tag, exc)
        while request.retried and not request.done.wait(0.1):
            with self.cond:
                self._check_deadlines()

    def _tagged(self, tag: int, reply: TaggedReply | errors.HyphaError) -> None:
        """A submitted generation's reply (in the executor's reader thread): stream it, answer it, or retry it."""
        with self.cond:
            if isinstance(reply, Streamed):
                entry = self.inflight.get(tag)
            else:
                entry = self.inflight.pop(tag, None)
                self.overdue.pop(tag, None)
        if entry is None:
            return  # it was answered already (its deadline passed, or its task gave up)
        request, executor = entry
        if isinstance(reply, Streamed):
            request.stream(reply)
            return
        if isinstance(reply, errors.HyphaError):  # the executor was lost with it in flight
            if isinstance(reply, KILLED):
                self._cache_changed({})
            if (isinstance(reply, (errors.ExecutorCrashed, errors.MemoryLimitExceeded)) and executor.lost_with > 1
                    and not request.retried and not request.cancelled and not self.pool.closed):
                request.retried = True  # run again alone: only the request that killed it fails
                self.submit(request)
            else:
                request.finish(error=reply)
            return
        if isinstance(reply, Error):
            request.finish(error=error_from_reply(reply, executor.name))
            return
        self._cache_changed(reply.cache)  # before the answer: a task that follows sees the model as held
        output, error = reply.outputs[0] if reply.outputs else None, reply.errors[0] if reply.errors else None
        if error is not None or output is None:
            request.finish(error=error_from_reply(error or Error("ExecutorCrashed", "no output"), executor.name))
            return
        request.generated = GeneratedItem(output=output, time_to_first_token_s=reply.time_to_first_token_s,
                                          compute_s=reply.compute_s, cache_hit=reply.cache_hit, load_s=reply.load_s,
                                          batch_size=reply.batch_size or 1, usage=reply.usage, dtype=reply.dtype)
        request.finish()

    def cancel(self, request: Request) -> None:
        """Its task gave up on ``request`` (revoked, interrupted): drop it, or end its row in the executor."""
        request.cancelled = True
        with self.cond:
            entry = self.inflight.pop(request.tag, None) if request.tag is not None else None
        if entry is not None:
            entry[1].cancel(request.tag)  # type: ignore[arg-type]
        request.finish(error=errors.ExecutionError("the generation was cancelled"))

    def _check_deadlines(self) -> None:
        """Under ``cond``: end submitted generations past their deadline; stop an executor that does not end them."""
        now = time.monotonic()
        for tag, (request, executor) in list(self.inflight.items()):
            if now >= request.deadline:
                del self.inflight[tag]
                self.overdue[tag] = (now, executor)
                executor.cancel(tag)
                request.finish(error=errors.TaskTimeout(
                    "the task ran past its task_timeout and was stopped (its row ended in the running batch)"))
        for tag, (since, executor) in list(self.overdue.items()):
            if not executor.alive:
                del self.overdue[tag]
            elif now - since > 2 * KILL_GRACE_S:
                log.error("executor %s did not end generation %d within %.0fs of its deadline: stopping it",
                          executor.name, tag, 2 * KILL_GRACE_S)
                del self.overdue[tag]
                threading.Thread(target=executor.kill, name="hypha-kill-overdue", daemon=True).start()

