"""``HyphaTask``: the base class of hypha's tasks (Celery's custom-base-class pattern).

It carries what the three tasks share: the guarded message strategy, the
errors they raise on purpose (``throws``: logged without a traceback), the
node context the worker hands over (:func:`~hypha_celery.worker.bootsteps.bind_tasks`),
and per-task timing and outcome metrics in ``before_start`` / ``after_return``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import Task, states

from hypha_celery.errors import HyphaError

if TYPE_CHECKING:
    from hypha_celery.worker.context import NodeContext

__all__ = ["HyphaTask", "NotInWorker"]

log = logging.getLogger(__name__)


class NotInWorker(RuntimeError):
    """A hypha task ran where no worker handed it a node context (e.g. called eagerly in a scheduler)."""


class HyphaTask(Task):
    Strategy = "hypha_celery.worker.strategy:guarded"
    throws = (HyphaError,)
    # STARTED is stored by the pipeline once the task is verified and validated, with its reservation in the
    # same Redis script call where it can (hypha_celery.worker.backend.started_with), not by Celery before it runs.
    track_started = False
    # How much of a result the worker's log line and Flower's task-succeeded event show (Celery's attribute; the
    # whole result is in the result backend): its output, model, worker and first metrics. Celery's default, 1024,
    # made its saferepr of hypha's nested result the largest cost a short task paid in the worker (about 200 us
    # against 50 us at 128 on the bench machine).
    resultrepr_maxsize = 128
    # What the worker's bootstep looks for to hand the node context over (the worker imports no task module).
    takes_node_context = True
    _node: NodeContext | None = None

    @property
    def node(self) -> NodeContext:
        """The worker process's collaborators, handed over when the worker starts."""
        if self._node is None:
            raise NotInWorker(f"{self.name} runs only in a hypha worker (`celery -A hypha_celery worker`)")
        return self._node

    @node.setter
    def node(self, ctx: NodeContext) -> None:
        self._node = ctx

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.request.hypha_started = time.monotonic()

    def after_return(
        self, status: str, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], einfo: Any
    ) -> None:
        """Count the outcome: Celery calls this for results and errors, not for deferred (ignored) copies.

        Celery calls it once the final state is stored: only then is the envelope's nonce marked
        finished, so a copy redelivered because the result could not be stored is not a replay.
        """
        if self._node is None or status not in (states.SUCCESS, states.FAILURE):
            return
        nonce = getattr(self.request, "hypha_nonce", None)
        if nonce is not None:
            try:
                self._node.verifier.mark_finished(nonce[0], nonce[1], task_id)
            except HyphaError as exc:
                log.warning("task %s: %s (a replay of it may run again while its result is gone)", task_id, exc)
        started = getattr(self.request, "hypha_started", None)
        runtime = None if started is None else time.monotonic() - started
        error = None if status == states.SUCCESS else type(retval).__name__
        self._node.metrics.task_finished(self.name, runtime, error)
