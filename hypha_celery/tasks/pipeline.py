"""The one path every hypha task takes: receive -> verify -> validate -> admit -> run -> package -> release.

Each stage is a function elsewhere (:mod:`~hypha_celery.security`,
:mod:`~hypha_celery.stages.validation`, :mod:`~hypha_celery.stages.admission`,
:mod:`~hypha_celery.executor.pool`, :mod:`~hypha_celery.stages.results`); this
module only wires them into a Celery task, handles deferral and the
duplicate-run guard, and reports stages as task events and states so Flower
and ``AsyncResult`` show where a task is.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from celery import Task, states
from celery.exceptions import Ignore

from hypha_celery.errors import ResourcesBusy
from hypha_celery.monitoring import metrics
from hypha_celery.resources.ledger import DuplicateTask, Lease
from hypha_celery.resources.requirements import Requirements
from hypha_celery.security import ENVELOPE_HEADER
from hypha_celery.stages import admission
from hypha_celery.stages.results import Timing
from hypha_celery.worker import context as node

__all__ = ["SENT_AT_HEADER", "WAITING", "Run", "run_task"]

log = logging.getLogger(__name__)

SENT_AT_HEADER = "hypha_sent_at"
RECHECK_HEADER = "hypha_recheck"  # a copy re-sent while another copy ran: check the result first
WAITING = "WAITING"
Spec = TypeVar("Spec")


@dataclass
class Run:
    """What a task body gets: the node, its lease, timing, and a way to report progress."""

    ctx: node.NodeContext
    task: Task
    lease: Lease
    timing: Timing
    worker: str

    @property
    def remaining_s(self) -> float:
        """Seconds left of ``task_timeout`` (it counts from admission)."""
        return max(0.0, self.timing.started_at + self.ctx.config.task_timeout - time.time())

    def progress(self, meta: dict[str, Any]) -> None:
        self.task.update_state(state="PROGRESS", meta=meta)
        self.task.send_event("task-progress", **meta)


def _header(task: Task, name: str, default: Any = None) -> Any:
    return getattr(task.request, name, None) or (task.request.headers or {}).get(name, default)


def _time_header(task: Task, name: str) -> float | None:
    """A unix time from an (unsigned) header: a finite number not in the future, else None."""
    value = _header(task, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return min(float(value), time.time())


def _attempt(task: Task) -> int:
    value = _header(task, admission.ATTEMPT_HEADER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10_000 else 0


def run_task(
    task: Task,
    kwargs: dict[str, Any],
    *,
    args: tuple[Any, ...] = (),
    validate: Callable[[node.NodeContext], Spec],
    requirements: Callable[[Spec], Requirements],
    body: Callable[[Run, Spec], dict[str, Any]],
    announce: bool = True,
) -> dict[str, Any]:
    """Run one task through every stage; ``body`` does the ML work and packages the result."""
    ctx = node.context()
    request = task.request
    worker = request.hostname or "unknown"
    timing = Timing(sent_at=_time_header(task, SENT_AT_HEADER))
    seen_before = False
    if ctx.config.security.verify_task_signatures:
        with metrics.rejections("signature"):
            verified = ctx.verifier.verify(
                _header(task, ENVELOPE_HEADER), task_name=task.name, task_id=request.id, args=args, kwargs=kwargs
            )
        seen_before = not verified.first_delivery
    with metrics.rejections("validation"):
        spec = validate(ctx)
    req = requirements(spec)
    if seen_before or _is_copy(task):
        _drop_if_finished(task)
    try:
        lease = admission.admit(ctx, req, task_id=request.id, holder=f"{worker}/{request.id}", worker_id=worker)
    except DuplicateTask as duplicate:
        _on_duplicate(task, duplicate)
    except ResourcesBusy as busy:
        _defer(ctx, task, req, busy, worker)
    ctx.keeper.add(lease)
    try:
        timing.started_at = time.time()
        if announce:
            task.send_event("task-running", device=lease.device, gpus=lease.gpu_ids, cores=lease.core_ids)
        with metrics.active():
            return body(Run(ctx, task, lease, timing, worker), spec)
    finally:
        if ctx.keeper.lost(lease):
            log.warning("task %s ran past its lease (lost at renewal); its resources were already reclaimed", request.id)
        ctx.keeper.release(lease)


def _is_copy(task: Task) -> bool:
    """A message that may have run before: redelivered by the broker, or re-sent by a worker."""
    request = task.request
    return bool(
        (request.delivery_info or {}).get("redelivered")
        or _header(task, RECHECK_HEADER)
        or _header(task, admission.ATTEMPT_HEADER)
    )


def _drop_if_finished(task: Task) -> None:
    state = task.AsyncResult(task.request.id).state
    if state in states.READY_STATES:
        log.info("task %s already finished (%s); dropping the redelivered copy", task.request.id, state)
        raise Ignore()


def _on_duplicate(task: Task, duplicate: DuplicateTask) -> NoReturn:
    """A second delivery of a task that a live lease is running: never run it twice."""
    _drop_if_finished(task)
    log.warning("%s; checking again later", duplicate)
    _republish(task, countdown=max(1.0, node.context().config.resources.lease_heartbeat), queue=None, attempt=None,
               recheck=True)
    raise Ignore()


def _defer(ctx: node.NodeContext, task: Task, req: Requirements, busy: ResourcesBusy, worker: str) -> NoReturn:
    attempt = _attempt(task)
    first_seen = _time_header(task, admission.FIRST_SEEN_HEADER) or time.time()
    deferral = admission.plan_deferral(ctx, req, busy, attempt=attempt, first_seen=first_seen, worker_id=worker)
    meta = {
        "stage": "admit",
        "reason": deferral.reason,
        "attempt": deferral.attempt,
        "waited_s": round(deferral.waited, 3),
        "retry_in_s": round(deferral.countdown, 3),
        "queue": deferral.queue,
    }
    task.update_state(state=WAITING, meta=meta)
    task.send_event("task-waiting", **meta)
    log.info("task %s deferred (attempt %d, retry in %.2fs%s): %s", task.request.id, deferral.attempt,
             deferral.countdown, f" on {deferral.queue}" if deferral.queue else "", deferral.reason)
    metrics.deferred(busy)
    _republish(task, countdown=deferral.countdown, queue=deferral.queue, attempt=deferral.attempt, first_seen=first_seen)
    raise Ignore()


def _republish(
    task: Task,
    *,
    countdown: float,
    queue: str | None,
    attempt: int | None,
    first_seen: float | None = None,
    recheck: bool = False,
) -> None:
    """Send this same message again (same id, same signed envelope), later or elsewhere."""
    request = task.request
    headers = dict(request.headers or {})
    for name in (ENVELOPE_HEADER, SENT_AT_HEADER, RECHECK_HEADER, admission.ATTEMPT_HEADER, admission.FIRST_SEEN_HEADER):
        value = getattr(request, name, None)
        if value is not None:
            headers[name] = value
    if attempt is not None:
        headers[admission.ATTEMPT_HEADER] = attempt
    if first_seen is not None:
        headers[admission.FIRST_SEEN_HEADER] = first_seen
    if recheck:
        headers[RECHECK_HEADER] = True
    routing = request.delivery_info or {}
    task.apply_async(
        args=request.args,
        kwargs=request.kwargs,
        task_id=request.id,
        countdown=countdown,
        queue=queue or routing.get("routing_key") or task.app.conf.task_default_queue,
        headers=headers,
    )
