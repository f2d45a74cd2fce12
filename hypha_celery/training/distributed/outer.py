"""DiLoCo's outer step (``hypha.aggregate``), from the deltas a round's inner tasks reported.

The task module (:mod:`hypha_celery.tasks.aggregate`) only registers and wires this.

Kwargs: ``job``, ``round``, ``base`` (the round's global version), ``base_sha256`` (optional: the
manifest sha256 the scheduler expects it to be), ``deltas`` (the inner tasks' ``diloco`` reports,
as the scheduler received them), ``weights`` (optional: inner task id -> the size of the shard the
scheduler sent it), ``aggregator`` (``mean``, ``trimmed_mean`` or ``median``; default ``mean``),
``trim`` (default 0.2), ``max_delta_norm_ratio`` (default 10), ``max_base_norm_ratio`` (default 1),
``outer_lr``, ``outer_momentum``, ``min_workers``, ``requirements``; round 0 of a LoRA job takes ``lora`` and
``seed`` instead of deltas.

Each delta is refused (and listed in the result's ``refused``, with the reason) unless its report
is for this job and round and this base, its key is its task's delta key (:func:`.layout.delta_task`),
names an inner task of ``weights`` (when given) and was not reported before in this step, the bytes
in the shared storage hash to the sha256 the inner task reported, its metadata and tensor shapes are
the base's, its encoding's checks pass (:mod:`.compression`: dtypes, scales) and every decoded value is finite.
The worker wrote that file and that sha256, so none of this
says its values are honest: a delta is also refused when its L2 norm is above
``max_delta_norm_ratio`` x the lower median norm of the round's finite deltas (``norms[(n-1)//2]``:
with two deltas the smaller, so that one large delta cannot raise its own bound), or above
``max_base_norm_ratio`` x the base's norm (``null`` turns a bound off; a median or base norm of 0
sets none). Fewer than ``min_workers`` accepted deltas fail the task (``DeltaRejected``).

The worker checks the reports and fetches the deltas (and the last momentum) into a scratch folder
under its store (``<model_dir>/.outer/``); the value checks, the combination and the step run in a job
executor under the task's lease, its memory cap among its limits (:mod:`.apply`, an
:class:`~hypha_celery.work.OuterStep`): a step over its reservation fails there by name
(``MemoryLimitExceeded``) and the worker serves on. Round 0 (``lora`` and ``seed``, no deltas) makes a
LoRA job's first adapter there instead. The rest are combined tensor by tensor (:func:`.deltas.combine_stack`): ``mean``
weighs each delta by its ``weights`` entry, what the scheduler decided and signed, never by the
``samples`` a worker reports (kept in the result as information only; without ``weights`` every
delta weighs 1); ``trimmed_mean`` (``ceil(trim x n)`` values dropped at each end of every
coordinate) and ``median`` are coordinate-wise and unweighted, for rounds where a minority may lie
within the norm bounds. The combination is applied with Nesterov momentum
(:mod:`.deltas`); the momentum is kept at :func:`.layout.momentum_key` (one file per base weight file)
for the next round. The deltas wait in the scratch folder for the combination: the worker's disk holds
one copy of each, the executor's memory one tensor of each and one weight file of output.

The next version (:func:`.layout.version_id`) is imported into the store (the same import as
``hypha-celery models import``: manifest, memory estimate, ``parent`` = the base) and uploaded to
its version keys (:func:`.layout.version_key`) in the shared storage, its manifest last, so workers
fetch it like any model. Idempotent by (job, round): the outcome is recorded at :func:`.layout.record_key`
last, a re-run returns that record, and a re-run after a crash part-way recomputes the same
inputs (fixed order) and keeps a version already uploaded. Outer steps of one (job, round) take
one Redis lock (:meth:`hypha_celery.keys.KeySchema.aggregate_lock`, expiring after the task's hard
time limit), so a second one sent while the first runs waits for it and answers its record.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from hypha_celery.errors import DeltaRejected, InvalidTask, RegistryUnavailable, SharedStorageError, TaskTimeout
from hypha_celery.executor.landlock import OUTER
from hypha_celery.keys import KeySchema
from hypha_celery.manifest import MODEL_MANIFEST, validate_model_id
from hypha_celery.models.shared_storage import SharedStorage
from hypha_celery.resources.requirements import Requirements
from hypha_celery.stages.results import package
from hypha_celery.stages.validation import requirements_for
from hypha_celery.training.distributed.deltas import AGGREGATORS
from hypha_celery.training.distributed.inner import parse_block
from hypha_celery.training.distributed.layout import (
    DELTA_SUFFIX,
    delta_task,
    momentum_key,
    record_key,
    round_prefix,
    version_id,
    version_key,
)
from hypha_celery.training.distributed.weights import weight_files
from hypha_celery.training.job import TaskRun
from hypha_celery.work import OuterStep
from hypha_celery.worker.context import NodeContext

__all__ = ["AggregateSpec", "Gathered", "gather", "run_outer", "validate_aggregate"]

log = logging.getLogger(__name__)

_ARGS = frozenset({"job", "round", "base", "base_sha256", "deltas", "weights", "aggregator", "trim",
                   "max_delta_norm_ratio", "max_base_norm_ratio", "outer_lr", "outer_momentum", "min_workers",
                   "requirements", "lora", "seed"})
_REPORT = ("job", "round", "ref", "sha256", "samples")
MAX_DELTAS = 10_000
MAX_WEIGHT = 2**53  # a shard size: integers up to here are exact in float64
DEFAULT_TRIM = 0.2
DEFAULT_DELTA_NORM_RATIO = 10.0
DEFAULT_BASE_NORM_RATIO = 1.0


@dataclass(frozen=True)
class AggregateSpec:
    job: str
    round: int
    base: str
    base_sha256: str | None
    deltas: list[dict[str, Any]]
    outer_lr: float
    outer_momentum: float
    min_workers: int
    requirements: Requirements
    weights: dict[str, int] | None = None
    aggregator: str = "mean"
    trim: float = DEFAULT_TRIM
    max_delta_norm_ratio: float | None = DEFAULT_DELTA_NORM_RATIO
    max_base_norm_ratio: float | None = DEFAULT_BASE_NORM_RATIO
    lora: dict[str, Any] | None = None  # round 0 of a LoRA job: the first adapter's settings
    seed: int = 0


def _number(kwargs: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = kwargs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InvalidTask(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _bound(kwargs: Mapping[str, Any], name: str, default: float, low: float) -> float | None:
    """A norm bound: ``None`` (JSON null) turns it off."""
    if name in kwargs and kwargs[name] is None:
        return None
    return _number(kwargs, name, default, low, 1e6)


def _weights(raw: Any) -> dict[str, int] | None:
    """``weights``: inner task id -> the positive integer size of the shard the scheduler sent it."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not 1 <= len(raw) <= MAX_DELTAS:
        raise InvalidTask(f"weights must be an object of 1 to {MAX_DELTAS} inner task ids -> shard sizes")
    for task_id, weight in raw.items():
        if not isinstance(task_id, str) or not 1 <= len(task_id) <= 200 or "/" in task_id:
            raise InvalidTask(f"weights: {task_id!r} is not an inner task id")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            raise InvalidTask(f"weights[{task_id!r}] must be an integer from 1 to 2**53 (a shard size), got {weight!r}")
    return dict(raw)


def validate_aggregate(ctx: NodeContext, args: Sequence[Any], kwargs: Mapping[str, Any]) -> AggregateSpec:
    """Every argument checked by name before anything is reserved (``InvalidTask``)."""
    if args:
        raise InvalidTask("hypha.aggregate takes keyword arguments only")
    unknown = sorted(set(kwargs) - _ARGS)
    if unknown:
        raise InvalidTask(f"hypha.aggregate got an unknown argument {unknown[0]!r} (it takes {', '.join(sorted(_ARGS))})")
    ctx.storage()
    if kwargs.get("round") == 0:
        return _validate_init(ctx, kwargs)
    block = parse_block({"job": kwargs.get("job"), "round": kwargs.get("round"), "inner_steps": 1})
    base = validate_model_id(kwargs.get("base"))
    pin = _pin(kwargs)
    deltas = kwargs.get("deltas")
    if not isinstance(deltas, list) or not 1 <= len(deltas) <= MAX_DELTAS:
        raise InvalidTask(f"deltas must be a list of 1 to {MAX_DELTAS} inner-task reports")
    for index, report in enumerate(deltas):
        if not isinstance(report, Mapping) or any(key not in report for key in _REPORT):
            raise InvalidTask(f"deltas[{index}] must be an inner task's report with {', '.join(_REPORT)}")
    min_workers = kwargs.get("min_workers", 1)
    if isinstance(min_workers, bool) or not isinstance(min_workers, int) or not 1 <= min_workers <= MAX_DELTAS:
        raise InvalidTask(f"min_workers must be an integer from 1 to {MAX_DELTAS}, got {min_workers!r}")
    aggregator = kwargs.get("aggregator", "mean")
    if aggregator not in AGGREGATORS:
        raise InvalidTask(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {aggregator!r}")
    trim = _number(kwargs, "trim", DEFAULT_TRIM, 0.0, 0.5)
    if trim >= 0.5:
        raise InvalidTask(f"trim must be a number from 0 to below 0.5, got {trim!r}")
    return AggregateSpec(job=block.job, round=block.round, base=base, base_sha256=pin, deltas=list(deltas),
                         outer_lr=_number(kwargs, "outer_lr", 0.7, 0.0, 100.0),
                         outer_momentum=_number(kwargs, "outer_momentum", 0.9, 0.0, 0.999),
                         min_workers=min_workers, requirements=requirements_for(ctx.config, kwargs.get("requirements")),
                         weights=_weights(kwargs.get("weights")), aggregator=aggregator, trim=trim,
                         max_delta_norm_ratio=_bound(kwargs, "max_delta_norm_ratio", DEFAULT_DELTA_NORM_RATIO, 1.0),
                         max_base_norm_ratio=_bound(kwargs, "max_base_norm_ratio", DEFAULT_BASE_NORM_RATIO, 1e-6))


def _pin(kwargs: Mapping[str, Any]) -> str | None:
    pin = kwargs.get("base_sha256")
    if pin is not None and (not isinstance(pin, str) or len(pin) != 64):
        raise InvalidTask(f"base_sha256 must be 64 hex characters, got {pin!r}")
    return pin


def _validate_init(ctx: NodeContext, kwargs: Mapping[str, Any]) -> AggregateSpec:
    """Round 0 of a LoRA job: ``lora`` settings (checked as ``hypha.train``'s) and a ``seed``, no deltas."""
    from hypha_celery.stages.validation import finetune_params

    block = parse_block({"job": kwargs.get("job"), "round": 1, "inner_steps": 1})
    base = validate_model_id(kwargs.get("base"))
    if "lora" not in kwargs or kwargs.get("deltas"):
        raise InvalidTask("hypha.aggregate round 0 makes a LoRA job's first adapter: it takes lora and no deltas")
    seed = kwargs.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise InvalidTask(f"seed must be an integer from 0 to 2**32 - 1, got {seed!r}")
    lora = finetune_params({"model": base, "method": "lora", "lora": kwargs["lora"]}, None).lora
    return AggregateSpec(job=block.job, round=0, base=base, base_sha256=_pin(kwargs), deltas=[], outer_lr=0.0,
                         outer_momentum=0.0, min_workers=1,
                         requirements=requirements_for(ctx.config, kwargs.get("requirements")), lora=lora, seed=seed)


def run_outer(run: TaskRun, spec: AggregateSpec) -> dict[str, Any]:
    """The round's outer step under its lock, or its record when it ran before; packaged as the task's result."""
    ctx = run.ctx
    storage = ctx.storage()
    with _round_lock(ctx, spec):
        recorded = storage.get_bytes(record_key(spec.job, spec.round))
        if recorded is not None:
            output = {**json.loads(recorded), "replayed": True}
            log.info("job %s round %d was aggregated before; answering from its record", spec.job, spec.round)
        else:
            began = time.monotonic()
            output = _aggregate(run, spec)
            output["outer_seconds"] = round(time.monotonic() - began, 3)
            slowest = output.get("inner_seconds")
            output["round_seconds"] = None if slowest is None else round(slowest + output["outer_seconds"], 3)
            storage.put_bytes(record_key(spec.job, spec.round), json.dumps(output, sort_keys=True).encode())
            if spec.round > 0:  # round 0 makes a LoRA job's first adapter: no deltas, no round of training
                ctx.metrics.diloco_round(bytes_moved=output["bytes_moved"], accepted=output["deltas"],
                                         refused=len(output["refused"]), delta_bytes=output["delta_bytes"],
                                         dense_bytes=output["dense_bytes"], round_seconds=output["round_seconds"])
    run.timing.finished_at = time.time()
    run.task.send_event("task-progress", stage="aggregated", job=spec.job, round=spec.round,
                        model_id=output["model_id"], workers=output["workers"], bytes_moved=output["bytes_moved"],
                        loss=output["loss"], refused=len(output["refused"]))
    return package(output=output, model=spec.base, worker=run.worker, lease=run.lease, timing=run.timing,
                   extra={"model_id": output["model_id"]})


@contextmanager
def _round_lock(ctx: NodeContext, spec: AggregateSpec) -> Iterator[None]:
    """Hold the (job, round) lock on the registry's Redis: a second outer step waits, then finds the record."""
    limit = ctx.config.hard_time_limit  # a holder killed mid-step frees it then; the next one recomputes
    lock = ctx.redis.lock(KeySchema.from_env().aggregate_lock(spec.job, spec.round), timeout=limit,
                          blocking_timeout=limit, thread_local=False)
    try:
        acquired = lock.acquire()
    except redis.RedisError as exc:
        raise RegistryUnavailable(f"cannot take job {spec.job} round {spec.round}'s outer-step lock: {exc}") from None
    if not acquired:
        raise TaskTimeout(f"job {spec.job} round {spec.round}: another outer step held the round's lock for "
                          f"{limit:g} s")
    try:
        yield
    finally:
        try:
            lock.release()
        except redis.RedisError as exc:  # it expired under a step longer than the hard limit: nothing to free
            log.warning("job %s round %d: the outer-step lock was gone at release (%s)", spec.job, spec.round, exc)


@dataclass
class Gathered:
    """A round's deltas after the checks: the accepted (report, file, weight, norm) and the refused with reasons."""

    accepted: list[tuple[dict[str, Any], Path, int, float]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    median_norm: float | None = None
    base_norm: float = 0.0

    def refuse(self, spec: AggregateSpec, report: Mapping[str, Any], reason: str) -> None:
        log.warning("job %s round %d: %s", spec.job, spec.round, reason)
        self.refused.append({"ref": report.get("ref"), "worker": report.get("worker"), "reason": reason})


def _what(report: Mapping[str, Any]) -> str:
    return f"delta {report.get('ref')!r} (from {report.get('worker', 'a worker')})"


def fetch(storage: SharedStorage, spec: AggregateSpec, base_sha256: str, scratch: Path, max_size: int
          ) -> tuple[list[tuple[dict[str, Any], Path, int]], Gathered]:
    """The worker's half of the checks: each report for this job, round and base, its key its task's, counted once,
    its bytes fetched into ``scratch`` and hashing to the reported sha256. The fetched (report, file, weight) in a
    fixed order (the same bits on a re-run), and the refused so far."""
    out = Gathered()
    fetched: list[tuple[dict[str, Any], Path, int]] = []
    seen: set[str] = set()
    for index, report in enumerate(sorted(spec.deltas, key=lambda r: str(r["ref"]))):
        what = _what(report)
        try:
            if str(report["ref"]) in seen:
                raise DeltaRejected(f"{what}: reported again; one delta counts once, refused")
            seen.add(str(report["ref"]))
            weight = _check_report(report, spec, base_sha256, what)
            path = scratch / f"{index}.safetensors"
            try:
                storage.get_file(report["ref"], path, sha256=report["sha256"], max_size=max_size)
            except SharedStorageError as exc:
                raise DeltaRejected(f"{what}: {exc}") from None
            fetched.append((report, path, weight))
        except DeltaRejected as exc:
            out.refuse(spec, report, str(exc))
    return fetched, out


def gather(storage: SharedStorage, spec: AggregateSpec, base: Mapping[str, Any], base_sha256: str, scratch: Path,
           max_size: int) -> Gathered:
    """Every check of the outer step on the deltas of ``spec`` against ``base`` (tensors by name) in one call: the
    worker's :func:`fetch`, then the executor's :func:`.apply.judge` (values, norms and their bounds)."""
    from hypha_celery.training.distributed.apply import judge
    from hypha_celery.training.distributed.deltas import l2_norm, shapes_of

    fetched, out = fetch(storage, spec, base_sha256, scratch, max_size)
    out.base_norm = l2_norm(base)
    judged = judge([(path, _what(report)) for report, path, _ in fetched], shapes_of(base),
                   {"job": spec.job, "round": str(spec.round), "base_sha256": base_sha256}, out.base_norm,
                   max_delta_norm_ratio=spec.max_delta_norm_ratio, max_base_norm_ratio=spec.max_base_norm_ratio)
    for index, reason in judged.refused:
        out.refuse(spec, fetched[index][0], reason)
    out.accepted = [(fetched[index][0], fetched[index][1], fetched[index][2], norm)
                    for index, norm in sorted(judged.accepted)]
    out.median_norm = judged.median_norm
    return out


def _aggregate(run: TaskRun, spec: AggregateSpec) -> dict[str, Any]:
    """Fetch the round's inputs into a scratch folder under the store, run the step in a job executor under the
    lease (:mod:`.apply`), upload the momentum and the next version."""
    ctx = run.ctx
    storage = ctx.storage()
    base_entry = ctx.store.open(spec.base)
    base_sha256 = base_entry.sha256
    if spec.base_sha256 is not None and spec.base_sha256 != base_sha256:
        raise DeltaRejected(f"base {spec.base!r} here is manifest {base_sha256[:12]}..., not the round's "
                            f"{spec.base_sha256[:12]}...; refusing to aggregate onto another model")
    expected = {"job": spec.job, "round": str(spec.round), "base_sha256": base_sha256}
    next_id = version_id(spec.job, spec.round)
    uploaded = storage.exists(version_key(next_id, MODEL_MANIFEST))
    scratch = Path(ctx.store.root, OUTER, f"{spec.job}-{spec.round}-{uuid.uuid4().hex[:8]}")
    scratch.mkdir(parents=True)
    try:
        fetched, gathered = fetch(storage, spec, base_sha256, scratch, ctx.store.max_model_size)
        momentum_in = None
        if spec.round > 1:
            momentum_in = {}
            (scratch / "previous").mkdir()
            for file in weight_files(base_entry):
                path = scratch / "previous" / file
                storage.get_file(momentum_key(spec.job, spec.round - 1, file), path, max_size=ctx.store.max_model_size)
                momentum_in[file] = str(path)
        step = OuterStep(job=spec.job, round=spec.round, base=spec.base, next_id=next_id, scratch=str(scratch),
                         deltas=[{"path": str(path), "weight": weight, "what": _what(report)}
                                 for report, path, weight in fetched],
                         expected=expected, momentum_in=momentum_in, lr=spec.outer_lr, momentum=spec.outer_momentum,
                         aggregator=spec.aggregator, trim=spec.trim, max_delta_norm_ratio=spec.max_delta_norm_ratio,
                         max_base_norm_ratio=spec.max_base_norm_ratio, min_workers=spec.min_workers,
                         publish=not uploaded and not ctx.store.taken(next_id), init_lora=spec.lora, seed=spec.seed)
        if spec.round > 0 and len(fetched) < spec.min_workers:  # the executor would refuse it: no need to start one
            raise DeltaRejected(f"job {spec.job} round {spec.round}: {len(fetched)} delta(s) passed the checks, fewer "
                                f"than min_workers ({spec.min_workers}): "
                                + ("; ".join(entry["reason"] for entry in gathered.refused) or "none refused"))
        try:
            stepped = ctx.executors.run_outer(step, lease=run.lease, timeout=run.remaining_s)
        except DeltaRejected as exc:  # too few passed the executor's checks: name the worker's refusals too
            if not gathered.refused:
                raise
            raise DeltaRejected(f"{exc}; refused before the step: "
                                + "; ".join(entry["reason"] for entry in gathered.refused)) from None
        for index, reason in ((entry["index"], entry["reason"]) for entry in stepped.refused):
            gathered.refuse(spec, fetched[index][0], reason)
        gathered.accepted = [(fetched[index][0], fetched[index][1], fetched[index][2], norm)
                             for index, norm in zip(stepped.accepted, stepped.norms, strict=True)]
        gathered.median_norm, gathered.base_norm = stepped.median_norm, stepped.base_norm
        for file, written in stepped.momentum.items():  # before the version: a re-run finds both or recomputes
            storage.put_file(momentum_key(spec.job, spec.round, file), Path(written))
        published = ctx.store.manifest_sha256(next_id) if uploaded else _publish(ctx, next_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    reports = [(report, weight) for report, _, weight, _ in gathered.accepted]
    return {
        "job": spec.job, "round": spec.round, "base": spec.base, "base_sha256": base_sha256,
        "model_id": next_id, "sha256": published,
        "workers": sorted({str(report.get("worker")) for report, _ in reports}), "deltas": len(reports),
        # What the workers say they trained on: information only, never a weight.
        "samples": sum(int(report["samples"]) for report, _ in reports),
        "weights": {str(report["ref"]): weight for report, weight in reports},
        "aggregator": spec.aggregator, "median_norm": gathered.median_norm, "base_norm": gathered.base_norm,
        "refused": gathered.refused,
        "loss": _weighted(reports, "start_loss"), "inner_loss": _weighted(reports, "loss"),
        # What crossed the network to and from the inner workers: each pulled the base, pushed a delta.
        "bytes_moved": _bytes_moved(reports),
        # The deltas as sent, against float32 (4 bytes a parameter): the compression; and the slowest inner task.
        "delta_bytes": _summed(reports, "bytes"), "dense_bytes": 4 * _summed(reports, "parameters"),
        "inner_seconds": max((s for s in (_reported(r.get("seconds")) for r, _ in reports) if s is not None),
                             default=None),
        "outer_lr": spec.outer_lr, "outer_momentum": spec.outer_momentum,
        "memory_peak": stepped.usage.memory_peak,
    }


def _check_report(report: Mapping[str, Any], spec: AggregateSpec, base_sha256: str, what: str) -> int:
    """The delta's weight (the scheduler's shard size; 1 without ``weights``), once the report is for this job,
    round and base and names a key of this round."""
    if report["job"] != spec.job or report["round"] != spec.round:
        raise DeltaRejected(f"{what}: it belongs to job {report['job']!r} round {report['round']!r}, not job "
                            f"{spec.job!r} round {spec.round}; refused (a straggler or another job's)")
    ref = report["ref"]
    task_id = delta_task(spec.job, spec.round, ref)
    if task_id is None:
        raise DeltaRejected(f"{what}: its key is not <task id>{DELTA_SUFFIX} in {round_prefix(spec.job, spec.round)}; "
                            "refused")
    if report.get("base_sha256", base_sha256) != base_sha256:
        raise DeltaRejected(f"{what}: trained from base manifest {str(report['base_sha256'])[:12]}..., not this "
                            f"round's {base_sha256[:12]}...; refused")
    samples = report["samples"]
    sha256 = report["sha256"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DeltaRejected(f"{what}: samples must be a positive integer, got {samples!r}")
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise DeltaRejected(f"{what}: sha256 must be 64 hex characters, got {sha256!r}")
    if spec.weights is None:
        return 1
    if task_id not in spec.weights:
        raise DeltaRejected(f"{what}: task {task_id!r} is not an inner task the scheduler weighed for this round; "
                            "refused")
    return spec.weights[task_id]


def _reported(value: Any) -> float | None:
    """A figure a worker wrote, or ``None`` unless it is a (non-bool) int below 2**53 in size or a finite float:
    information only, so a hostile one is skipped and can never raise (``10**400`` overflows ``float``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value) if abs(value) < MAX_WEIGHT else None
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def _weighted(reports: list[tuple[dict[str, Any], int]], key: str) -> float | None:
    """A reported loss, averaged with the scheduler's weights (finite values only: a worker wrote them)."""
    values = [(value, w) for value, w in ((_reported(r.get(key)), w) for r, w in reports) if value is not None]
    if not values:
        return None
    return sum(value * w for value, w in values) / sum(w for _, w in values)


def _bytes_moved(reports: list[tuple[dict[str, Any], int]]) -> int:
    """What the workers say crossed the network (the base pulled, the delta pushed); unusable figures count 0."""
    return sum(int(_reported(report.get(key)) or 0) for report, _ in reports for key in ("bytes", "base_bytes"))


def _summed(reports: list[tuple[dict[str, Any], int]], key: str) -> int:
    """A reported count summed over the reports (information only: unusable or negative figures count 0)."""
    return sum(max(0, int(_reported(report.get(key)) or 0)) for report, _ in reports)


def _publish(ctx: NodeContext, next_id: str) -> str:
    """Upload the stored ``next_id`` to its version keys, manifest last; returns its manifest's sha256."""
    storage = ctx.storage()
    stored = ctx.store.open(next_id)
    for name, path in stored.files().items():
        storage.put_file(version_key(next_id, name), path)
    storage.put_file(version_key(next_id, MODEL_MANIFEST), stored.manifest_file)
    return stored.sha256
