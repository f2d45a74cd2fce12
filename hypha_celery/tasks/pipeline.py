"""The one path every hypha task takes: receive -> verify -> validate -> admit -> run -> package -> sign -> release.

Each stage is a function elsewhere (:mod:`~hypha_celery.security`,
:mod:`~hypha_celery.stages.validation`, :mod:`~hypha_celery.stages.admission`,
:mod:`~hypha_celery.executor.pool`, :mod:`~hypha_celery.stages.results`); this
module only wires them into a Celery task, handles deferral and the
duplicate-run guard, and reports stages as task events and states so Flower
and ``AsyncResult`` show where a task is. Its collaborators come from the
task's node context (:attr:`HyphaTask.node <hypha_celery.tasks.base.HyphaTask.node>`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

from celery import states
from celery.exceptions import Ignore

from hypha_celery import headers
from hypha_celery.errors import (
    DuplicateTask,
    HyphaError,
    InsufficientCapabilities,
    InvalidSignature,
    InvalidTask,
    ModelTooLarge,
    NotHere,
    ResourcesBusy,
    UnsupportedModel,
)
from hypha_celery.manifest import Manifest
from hypha_celery.monitoring.tracing import Span
from hypha_celery.resources.gpu import gpu_utilization
from hypha_celery.resources.ledger import Lease
from hypha_celery.resources.requirements import Requirements
from hypha_celery.security import ENVELOPE_HEADER, MODEL_SHA256, attest, check_model_sha256
from hypha_celery.stages import admission
from hypha_celery.stages.results import Timing, package
from hypha_celery.stages.sizing import requirements_for_model
from hypha_celery.stages.validation import check_model_pin
from hypha_celery.tasks.base import HyphaTask
from hypha_celery.worker.backend import mark_started, release_with_result, started_with
from hypha_celery.worker.context import NodeContext

__all__ = ["WAITING", "ModelSpec", "Run", "model_under_lease", "package_inferred", "run_task", "sized"]

log = logging.getLogger(__name__)

WAITING = "WAITING"
# What validation raises about the task itself; anything else (a Redis outage) is not the task's fault.
_VALIDATION_REFUSALS = (InvalidTask, UnsupportedModel, ModelTooLarge, InsufficientCapabilities)


class Spec(Protocol):
    """A validated task: every spec says what it must reserve."""

    @property
    def requirements(self) -> Requirements: ...


S = TypeVar("S", bound=Spec)


class ModelSpec(Spec, Protocol):
    """A validated task on a stored model; ``manifest`` is None when the model must be fetched."""

    @property
    def model(self) -> str: ...

    @property
    def manifest(self) -> Manifest | None: ...


M = TypeVar("M", bound=ModelSpec)


def sized(ctx: NodeContext, spec: M, raw: Any, tokens: Callable[[Manifest], int] = lambda _: 0, *,
          generation: bool = False) -> M:
    """``spec`` with its ``"auto"`` requirements sized from its model's manifest (read, not fetched).

    ``raw``: the task's ``requirements`` kwarg; ``tokens``: the KV-cache tokens the request needs;
    ``generation``: they are held for the whole request, against the device's KV budget.
    A LoRA adapter is sized on its base as well.
    """
    manifest = spec.manifest or ctx.store.peek(spec.model)
    base = ctx.store.peek(manifest.adapter_of.id) if manifest.adapter_of is not None else None
    requirements = requirements_for_model(ctx.config, raw, manifest, holds=ctx.holds, tokens=tokens(manifest),
                                          base=base, generation=generation)
    return dataclasses.replace(spec, requirements=requirements)  # type: ignore[type-var]


def model_under_lease(run: Run, spec: ModelSpec, check: Callable[[Manifest], None]) -> Manifest:
    """The task's manifest: fetched (and verified, pin and ``check`` included) now if validation could not read
    it locally; an adapter's base fetched too (the executor attaches the adapter to it)."""
    ctx = run.ctx
    manifest = spec.manifest
    with ctx.tracing.span("hypha.load", {"hypha.model": spec.model, "hypha.fetched": manifest is None}):
        if manifest is None:
            run.task.send_event("task-loading", model=spec.model)
            manifest = ctx.store.manifest(spec.model)
            check_model_pin(ctx.store, spec.model, run.model_sha256)
            check(manifest)
        if manifest.adapter_of is not None:
            ctx.store.manifest(manifest.adapter_of.id)
    return manifest


@dataclass
class Run:
    """What a task body gets: the node, its lease, timing, the model pin, and a way to report progress."""

    ctx: NodeContext
    task: HyphaTask
    lease: Lease
    timing: Timing
    worker: str
    model_sha256: str | None = None  # the envelope's pin: a body that fetches its model checks it after
    copy: bool = False  # the message may have run before (redelivered, or re-sent by a worker)
    ran_before: bool = False  # and it did: its state said it had started, or the broker redelivered it
    since: float | None = None  # an earlier run's admission, when the body learns of one (a continued generation)

    @property
    def remaining_s(self) -> float:
        """Seconds left of ``task_timeout`` (it counts from admission: an earlier run's, for a continued task)."""
        started = min(self.timing.started_at, self.since) if self.since else self.timing.started_at
        return max(0.0, started + self.ctx.config.task_timeout - time.time())

    def finished(self, model: str, *, cache_hit: bool, batch_size: int) -> None:
        """The ML work is done: stamp the time, count the cache event, record the model's inference time."""
        ctx = self.ctx
        self.timing.finished_at = time.time()
        ctx.metrics.cache_event(hit=cache_hit, batch_size=batch_size)
        ctx.inference_times.observe(model, self.timing.finished_at - self.timing.started_at)
        try:
            ctx.inference_times.flush(ctx.redis, self.worker)
        except HyphaError as exc:  # the moving average is advisory; the result is not
            log.warning("could not record the inference time: %s", exc)

    def executor_span(self) -> Span:
        """The span of one round trip to this task's executor (``hypha.executor``): the device it runs on."""
        return self.ctx.tracing.span("hypha.executor", {"hypha.device": self.lease.device})

    def progress(self, meta: dict[str, Any]) -> None:
        self.task.update_state(state="PROGRESS", meta=meta)
        self.task.send_event("task-progress", **meta)

    def package(self, output: Any, model: str, *, load_s: float, cache_hit: bool, memory_peak: int,
                device: str | None, gpu_memory_peak: int | None, **extra: Any) -> dict[str, Any]:
        """The result of an executor's answer: ``output`` with this run's worker, lease, timing and GPUs' use
        (a ``hypha.package`` span); ``extra`` goes to its metrics."""
        with self.ctx.tracing.span("hypha.package"):
            return package(
                output=output,
                model=model,
                worker=self.worker,
                lease=self.lease,
                timing=self.timing,
                load_s=load_s,
                cache_hit=cache_hit,
                memory_peak=memory_peak,
                device=device,
                gpu_utilization={g: u for g, u in gpu_utilization().items() if g in self.lease.gpus},
                extra={**extra, **({"gpu_memory_peak": gpu_memory_peak} if gpu_memory_peak is not None else {})},
            )


def package_inferred(run: Run, model: str, item: Any, **extra: Any) -> dict[str, Any]:
    """The result of one executor ``infer`` answer (``hypha.infer``, ``hypha.verify``), with ``extra`` metrics."""
    run.finished(model, cache_hit=item.cache_hit, batch_size=item.batch_size)
    return run.package(item.output, model, load_s=item.load_s, cache_hit=item.cache_hit, memory_peak=item.memory_peak,
                       device=item.device, gpu_memory_peak=item.gpu_memory_peak, compute_s=item.compute_s,
                       cpu_affinity=item.cpu_affinity, **extra)


def _header(task: HyphaTask, name: str, default: Any = None) -> Any:
    return getattr(task.request, name, None) or (task.request.headers or {}).get(name, default)


def _time_header(task: HyphaTask, name: str) -> float | None:
    """A unix time from an (unsigned) header: a finite number not in the future, else None."""
    value = _header(task, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return min(float(value), time.time())


def _attempt(task: HyphaTask) -> int:
    value = _header(task, headers.ATTEMPT, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10_000 else 0


def run_task(
    task: HyphaTask,
    kwargs: dict[str, Any],
    *,
    args: tuple[Any, ...] = (),
    validate: Callable[[NodeContext], S],
    body: Callable[[Run, S], dict[str, Any]],
    announce: bool = True,
) -> dict[str, Any]:
    """Run one task through every stage; ``body`` does the ML work and packages the result.

    Each stage is a span (:mod:`hypha_celery.monitoring.tracing`) under one ``hypha.task`` span.
    """
    with task.node.tracing.span("hypha.task", {"hypha.task": task.name, "hypha.task_id": task.request.id}) as span:
        return _stages(task, kwargs, args, validate, body, announce, span)


def _stages(
    task: HyphaTask,
    kwargs: dict[str, Any],
    args: tuple[Any, ...],
    validate: Callable[[NodeContext], S],
    body: Callable[[Run, S], dict[str, Any]],
    announce: bool,
    span: Span,
) -> dict[str, Any]:
    ctx = task.node
    tracing = ctx.tracing
    request = task.request
    worker = request.hostname or "unknown"
    timing = Timing(sent_at=_time_header(task, headers.SENT_AT))
    seen_before = False
    verify = ctx.config.security.verify_task_signatures
    pin: str | None = None
    answers: str | None = None  # the verified request's digest, which a signed result names
    if verify:
        with tracing.span("hypha.verify"):
            try:
                verified = ctx.verifier.verify(
                    _header(task, ENVELOPE_HEADER), task_name=task.name, task_id=request.id, args=args, kwargs=kwargs
                )
            except InvalidSignature:
                ctx.metrics.refused("signature")
                raise
        seen_before = not verified.first_delivery
        pin = verified.model_sha256
        answers = verified.request_sha256
        if verified.finished:
            _refuse_finished(ctx, task)
        request.hypha_nonce = (verified.key_id, verified.nonce)  # marked finished in HyphaTask.after_return
    with tracing.span("hypha.validate"):
        try:
            spec = validate(ctx)
            if not verify:
                pin = _unverified_pin(task)
            if pin is not None:
                check_model_pin(ctx.store, kwargs.get("model"), pin)
        except _VALIDATION_REFUSALS:
            ctx.metrics.refused("validation")
            raise
    span.set("hypha.model", getattr(spec, "model", None))
    req = spec.requirements
    copy = seen_before or _is_copy(task)
    ran_before = copy and (_drop_if_finished(task) in (states.STARTED, "PROGRESS") or _redelivered(task))
    if getattr(spec, "finished", None) is not None:  # a copy whose output exists (train: its model): no lease, no run
        mark_started(task)
        timing.started_at = time.time()
        nothing = Lease(id="", node=ctx.node_id, memory=0, cores={}, gpus={}, exclusive_gpu=False, task_id=request.id)
        with tracing.span("hypha.run", {"hypha.copy_finished": True}):
            result = body(Run(ctx, task, nothing, timing, worker, pin), spec)
        return _signed(ctx, task, result, worker, answers)
    with tracing.span("hypha.admit") as admit:
        try:
            lease = admission.admit(ctx.ledger, ctx.placement, req, task_id=request.id, holder=f"{worker}/{request.id}",
                                    worker_id=worker, via=started_with(task, ctx.ledger))  # STARTED and the lease: one trip
        except DuplicateTask as duplicate:
            admit.set("hypha.duplicate", True)
            _on_duplicate(task, duplicate)
        except (ResourcesBusy, NotHere) as reason:
            admit.set("hypha.deferred", str(reason))
            _defer(ctx, task, req, reason, worker)
        admit.set("hypha.device", lease.device)
    ctx.keeper.add(lease)
    try:
        timing.started_at = time.time()
        if announce:
            task.send_event("task-running", device=lease.device, gpus=lease.gpu_ids, cores=lease.core_ids)
        with ctx.metrics.active():
            with tracing.span("hypha.run"):
                result = body(Run(ctx, task, lease, timing, worker, pin, copy=copy, ran_before=ran_before), spec)
            return _signed(ctx, task, result, worker, answers)
    finally:
        if ctx.keeper.lost(lease):
            log.warning("task %s ran past its lease (lost at renewal); its resources were already reclaimed", request.id)
        release_with_result(task, ctx.keeper, lease)  # in the result's own round trip where it can


def _signed(
    ctx: NodeContext, task: HyphaTask, result: dict[str, Any], worker: str, request_sha256: str | None
) -> dict[str, Any]:
    """``result`` with this worker's signed attestation (``sign_results``), binding it to the request received.

    ``request_sha256``: the verified envelope's digest; without verification, the header's (if any).
    """
    if ctx.identity is None:
        return result
    try:
        with ctx.tracing.span("hypha.sign"):
            return attest(ctx.identity, result, task_id=task.request.id, task_name=task.name, worker=worker,
                          request_sha256=request_sha256,
                          envelope=None if request_sha256 is not None else _header(task, ENVELOPE_HEADER))
    except (TypeError, ValueError) as exc:  # NaN, an integer beyond 2**53: JSON no scheduler can verify
        log.warning("task %s: its result has no RFC 8785 form, so it is stored unsigned: %s", task.request.id, exc)
        return result


def _unverified_pin(task: HyphaTask) -> str | None:
    """The model pin in an envelope nobody verified (signatures off): still honoured, as a pin only restricts."""
    envelope = _header(task, ENVELOPE_HEADER)
    if not isinstance(envelope, dict) or MODEL_SHA256 not in envelope:
        return None
    try:
        return check_model_sha256(envelope[MODEL_SHA256])
    except ValueError as exc:
        raise InvalidTask(f"the {ENVELOPE_HEADER} header's {exc}") from None


def _refuse_finished(ctx: NodeContext, task: HyphaTask) -> NoReturn:
    """A copy of a signed task that already finished: dropped while its result is stored, else a replay."""
    _drop_if_finished(task)
    ctx.metrics.refused("signature")
    raise InvalidSignature(
        f"replayed: task {task.request.id} already finished under this envelope's nonce, and its result is gone;"
        " it does not run again"
    )


def _is_copy(task: HyphaTask) -> bool:
    """A message that may have run before: redelivered by the broker, or re-sent by a worker."""
    request = task.request
    return bool(
        (request.delivery_info or {}).get("redelivered")
        or _header(task, headers.RECHECK)
        or _header(task, headers.ATTEMPT)
    )


def _redelivered(task: HyphaTask) -> bool:
    """The broker (or the sweeper, or the duplicate guard) handed this message back after a worker had it."""
    return bool((task.request.delivery_info or {}).get("redelivered") or _header(task, headers.RECHECK))


def _drop_if_finished(task: HyphaTask) -> str:
    """The task's state in the result backend; a finished task's copy is dropped (``Ignore``)."""
    state = str(task.AsyncResult(task.request.id).state)
    if state in states.READY_STATES:
        log.info("task %s already finished (%s); dropping the redelivered copy", task.request.id, state)
        raise Ignore()
    return state


def _on_duplicate(task: HyphaTask, duplicate: DuplicateTask) -> NoReturn:
    """A second delivery of a task that a live lease is running: never run it twice."""
    _drop_if_finished(task)
    log.warning("%s; checking again later", duplicate)
    _republish(task, countdown=max(1.0, task.node.config.resources.lease_heartbeat), queue=None, attempt=None,
               recheck=True)
    raise Ignore()


def _defer(
    ctx: NodeContext, task: HyphaTask, req: Requirements, reason: ResourcesBusy | NotHere, worker: str
) -> NoReturn:
    first_seen = _time_header(task, headers.FIRST_SEEN) or time.time()
    deferral = admission.plan_deferral(ctx.config.admission, ctx.placement, req, reason, node_id=ctx.node_id,
                                       worker_id=worker, attempt=_attempt(task), first_seen=first_seen)
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
    ctx.metrics.deferred(not_here=isinstance(reason, NotHere))
    _republish(task, countdown=deferral.countdown, queue=deferral.queue, attempt=deferral.attempt, first_seen=first_seen)
    raise Ignore()


def _republish(
    task: HyphaTask,
    *,
    countdown: float,
    queue: str | None,
    attempt: int | None,
    first_seen: float | None = None,
    recheck: bool = False,
) -> None:
    """Send this same message again (same id, same signed envelope), later or elsewhere."""
    request = task.request
    sent = dict(request.headers or {})
    for name in (ENVELOPE_HEADER, headers.SENT_AT, headers.RECHECK, headers.ATTEMPT, headers.FIRST_SEEN):
        value = getattr(request, name, None)
        if value is not None:
            sent[name] = value
    if attempt is not None:
        sent[headers.ATTEMPT] = attempt
    if first_seen is not None:
        sent[headers.FIRST_SEEN] = first_seen
    if recheck:
        sent[headers.RECHECK] = True
    routing = request.delivery_info or {}
    task.apply_async(
        args=request.args,
        kwargs=request.kwargs,
        task_id=request.id,
        countdown=countdown,
        queue=queue or routing.get("routing_key") or task.app.conf.task_default_queue,
        headers=sent,
    )
