"""``hypha.aggregate``: DiLoCo's outer step, from the deltas a round's inner tasks reported.

Kwargs: ``job``, ``round``, ``base`` (the round's global version), ``base_sha256`` (optional: the
manifest sha256 the scheduler expects it to be), ``deltas`` (the inner tasks' ``diloco`` reports,
as the scheduler received them), ``outer_lr``, ``outer_momentum``, ``min_workers``, ``requirements``.

Each delta is refused (and listed in the result's ``refused``, with the reason) unless its report
is for this job and round and this base, its key lies in this round's folder, the bytes in the
shared storage hash to the sha256 the inner task reported, and its metadata and tensor shapes are
the base's. Fewer than ``min_workers`` accepted deltas fail the task (``DeltaRejected``). The rest
are averaged by sample count and applied with Nesterov momentum (:mod:`hypha_celery.models.deltas`);
the momentum is kept as ``jobs/<job>/momentum-<round>.safetensors`` for the next round.

The next version, ``<job>-v<round>``, is imported into the store (the same import as ``hypha-celery
models import``: manifest, memory estimate, ``parent`` = the base) and uploaded to
``models/<id>/`` of the shared storage, its manifest last, so workers fetch it like any model.
Idempotent by (job, round): the outcome is recorded in ``jobs/<job>/round-<round>/aggregate.json``
last, a re-run returns that record, and a re-run after a crash part-way recomputes the same
inputs (fixed order) and keeps a version already uploaded.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import shared_task

from hypha_celery.errors import DeltaRejected, InvalidTask, SharedStorageError
from hypha_celery.models.manifest import MODEL_MANIFEST, SAFETENSORS_SINGLE, validate_model_id
from hypha_celery.resources.requirements import Requirements
from hypha_celery.stages.results import package
from hypha_celery.stages.validation import requirements_for
from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.diloco import delta_prefix, parse_block, version_id
from hypha_celery.tasks.pipeline import Run, run_task
from hypha_celery.worker.context import NodeContext

__all__ = ["aggregate", "record_key"]

log = logging.getLogger(__name__)

_ARGS = frozenset({"job", "round", "base", "base_sha256", "deltas", "outer_lr", "outer_momentum", "min_workers",
                   "requirements"})
_REPORT = ("job", "round", "ref", "sha256", "samples")
MAX_DELTAS = 10_000


def record_key(job: str, round_: int) -> str:
    return f"{delta_prefix(job, round_)}aggregate.json"


def momentum_key(job: str, round_: int) -> str:
    return f"jobs/{job}/momentum-{round_}.safetensors"


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


def _number(kwargs: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = kwargs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InvalidTask(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def validate_aggregate(ctx: NodeContext, args: Sequence[Any], kwargs: Mapping[str, Any]) -> AggregateSpec:
    """Every argument checked by name before anything is reserved (``InvalidTask``)."""
    if args:
        raise InvalidTask("hypha.aggregate takes keyword arguments only")
    unknown = sorted(set(kwargs) - _ARGS)
    if unknown:
        raise InvalidTask(f"hypha.aggregate got an unknown argument {unknown[0]!r} (it takes {', '.join(sorted(_ARGS))})")
    ctx.storage()
    block = parse_block({"job": kwargs.get("job"), "round": kwargs.get("round"), "inner_steps": 1})
    base = validate_model_id(kwargs.get("base"))
    pin = kwargs.get("base_sha256")
    if pin is not None and (not isinstance(pin, str) or len(pin) != 64):
        raise InvalidTask(f"base_sha256 must be 64 hex characters, got {pin!r}")
    deltas = kwargs.get("deltas")
    if not isinstance(deltas, list) or not 1 <= len(deltas) <= MAX_DELTAS:
        raise InvalidTask(f"deltas must be a list of 1 to {MAX_DELTAS} inner-task reports")
    for index, report in enumerate(deltas):
        if not isinstance(report, Mapping) or any(key not in report for key in _REPORT):
            raise InvalidTask(f"deltas[{index}] must be an inner task's report with {', '.join(_REPORT)}")
    min_workers = kwargs.get("min_workers", 1)
    if isinstance(min_workers, bool) or not isinstance(min_workers, int) or not 1 <= min_workers <= MAX_DELTAS:
        raise InvalidTask(f"min_workers must be an integer from 1 to {MAX_DELTAS}, got {min_workers!r}")
    return AggregateSpec(job=block.job, round=block.round, base=base, base_sha256=pin, deltas=list(deltas),
                         outer_lr=_number(kwargs, "outer_lr", 0.7, 0.0, 100.0),
                         outer_momentum=_number(kwargs, "outer_momentum", 0.9, 0.0, 0.999),
                         min_workers=min_workers, requirements=requirements_for(ctx.config, kwargs.get("requirements")))


def _run(run: Run, spec: AggregateSpec) -> dict[str, Any]:
    ctx = run.ctx
    storage = ctx.storage()
    recorded = storage.get_bytes(record_key(spec.job, spec.round))
    if recorded is not None:
        output = {**json.loads(recorded), "replayed": True}
        log.info("job %s round %d was aggregated before; answering from its record", spec.job, spec.round)
    else:
        output = _aggregate(ctx, spec)
        storage.put_bytes(record_key(spec.job, spec.round), json.dumps(output, sort_keys=True).encode())
        ctx.metrics.diloco_round(bytes_moved=output["bytes_moved"], accepted=output["deltas"],
                                 refused=len(output["refused"]))
    run.timing.finished_at = time.time()
    run.task.send_event("task-progress", stage="aggregated", job=spec.job, round=spec.round,
                        model_id=output["model_id"], workers=output["workers"], bytes_moved=output["bytes_moved"],
                        loss=output["loss"], refused=len(output["refused"]))
    return package(output=output, model=spec.base, worker=run.worker, lease=run.lease, timing=run.timing,
                   extra={"model_id": output["model_id"]})


def _aggregate(ctx: NodeContext, spec: AggregateSpec) -> dict[str, Any]:
    from hypha_celery.models.deltas import WeightedMean, check_delta, load_weights, nesterov, save_tensors

    storage = ctx.storage()
    manifest, base_folder = ctx.store.verified_folder(spec.base)
    base_sha256 = ctx.store.manifest_sha256(spec.base)
    if spec.base_sha256 is not None and spec.base_sha256 != base_sha256:
        raise DeltaRejected(f"base {spec.base!r} here is manifest {base_sha256[:12]}..., not the round's "
                            f"{spec.base_sha256[:12]}...; refusing to aggregate onto another model")
    base = load_weights(base_folder / SAFETENSORS_SINGLE, f"model {spec.base!r}")
    expected = {"job": spec.job, "round": str(spec.round), "base_sha256": base_sha256}
    mean = WeightedMean()  # added in the order of the refs: the same inputs give the same bits
    accepted: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hypha-aggregate-") as scratch:
        for index, report in enumerate(sorted(spec.deltas, key=lambda r: str(r["ref"]))):
            what = f"delta {report.get('ref')!r} (from {report.get('worker', 'a worker')})"
            try:
                samples = _check_report(report, spec, base_sha256, what)
                path = Path(scratch) / f"{index}.safetensors"
                try:
                    storage.get_file(report["ref"], path, sha256=report["sha256"], max_size=ctx.store.max_model_size)
                except SharedStorageError as exc:
                    raise DeltaRejected(f"{what}: {exc}") from None
                mean.add(check_delta(path, base, expected, what), samples)
                accepted.append(report)
                path.unlink()
            except DeltaRejected as exc:
                log.warning("job %s round %d: %s", spec.job, spec.round, exc)
                refused.append({"ref": report.get("ref"), "worker": report.get("worker"), "reason": str(exc)})
        if len(accepted) < spec.min_workers:
            reasons = "; ".join(entry["reason"] for entry in refused) or "none refused"
            raise DeltaRejected(f"job {spec.job} round {spec.round}: {len(accepted)} delta(s) passed the checks, "
                                f"fewer than min_workers ({spec.min_workers}): {reasons}")
        previous = None
        if spec.round > 1:
            path = Path(scratch) / "momentum.safetensors"
            storage.get_file(momentum_key(spec.job, spec.round - 1), path, max_size=ctx.store.max_model_size)
            previous = load_weights(path, f"job {spec.job}'s momentum after round {spec.round - 1}")
            if previous.keys() != base.keys():
                raise DeltaRejected(f"job {spec.job}'s momentum does not match the base's tensors")
        weights, momentum = nesterov(base, mean.mean(), previous, lr=spec.outer_lr, momentum=spec.outer_momentum)
        moment = Path(scratch) / "momentum-next.safetensors"
        save_tensors(momentum, moment, expected)
        storage.put_file(momentum_key(spec.job, spec.round), moment)
        next_id = version_id(spec.job, spec.round)
        _publish(ctx, manifest.task, spec.base, base_folder, next_id, weights, Path(scratch) / "next", expected)
    reports = accepted
    samples = sum(int(report["samples"]) for report in reports)
    return {
        "job": spec.job, "round": spec.round, "base": spec.base, "base_sha256": base_sha256,
        "model_id": next_id, "sha256": ctx.store.manifest_sha256(next_id),
        "workers": sorted({str(report.get("worker")) for report in reports}), "deltas": len(reports),
        "samples": samples, "refused": refused,
        "loss": _weighted(reports, "start_loss", samples), "inner_loss": _weighted(reports, "loss", samples),
        # What crossed the network to and from the inner workers: each pulled the base, pushed a delta.
        "bytes_moved": sum(int(report.get("bytes", 0)) + int(report.get("base_bytes", 0)) for report in reports),
        "outer_lr": spec.outer_lr, "outer_momentum": spec.outer_momentum,
    }


def _check_report(report: Mapping[str, Any], spec: AggregateSpec, base_sha256: str, what: str) -> int:
    """The report's sample count, once it is for this job, round and base and names a key of this round."""
    if report["job"] != spec.job or report["round"] != spec.round:
        raise DeltaRejected(f"{what}: it belongs to job {report['job']!r} round {report['round']!r}, not job "
                            f"{spec.job!r} round {spec.round}; refused (a straggler or another job's)")
    ref = report["ref"]
    if not isinstance(ref, str) or not ref.startswith(delta_prefix(spec.job, spec.round)) or "/" in ref[
            len(delta_prefix(spec.job, spec.round)):]:
        raise DeltaRejected(f"{what}: its key is not in {delta_prefix(spec.job, spec.round)}; refused")
    if report.get("base_sha256", base_sha256) != base_sha256:
        raise DeltaRejected(f"{what}: trained from base manifest {str(report['base_sha256'])[:12]}..., not this "
                            f"round's {base_sha256[:12]}...; refused")
    samples = report["samples"]
    sha256 = report["sha256"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DeltaRejected(f"{what}: samples must be a positive integer, got {samples!r}")
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise DeltaRejected(f"{what}: sha256 must be 64 hex characters, got {sha256!r}")
    return samples


def _weighted(reports: list[dict[str, Any]], key: str, samples: int) -> float | None:
    values = [(float(r[key]), int(r["samples"])) for r in reports if isinstance(r.get(key), (int, float))]
    if not values or not samples:
        return None
    return sum(value * n for value, n in values) / sum(n for _, n in values)


def _publish(ctx: NodeContext, task: str | None, base_id: str, base_folder: Path, next_id: str,
             weights: Mapping[str, Any], folder: Path, metadata: Mapping[str, str]) -> None:
    """Store ``next_id`` (the base's files with the new weights) and upload it to ``models/<id>/``, manifest last."""
    from hypha_celery.models.deltas import save_tensors

    storage = ctx.storage()
    if storage.exists(f"models/{next_id}/{MODEL_MANIFEST}"):
        return  # a run that died after uploading it: the same inputs made the same version
    if not ctx.store.has(next_id):
        folder.mkdir()
        manifest = ctx.store.manifest(base_id)
        for name in manifest.files:
            if name != SAFETENSORS_SINGLE:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(base_folder / name, folder / name)
        save_tensors(weights, folder / SAFETENSORS_SINGLE, metadata)
        ctx.store.import_hf(folder, next_id, task, parent=base_id)
    stored, path = ctx.store.verified_folder(next_id)
    for name in stored.files:
        storage.put_file(f"models/{next_id}/{name}", path / name)
    storage.put_file(f"models/{next_id}/{MODEL_MANIFEST}", path / MODEL_MANIFEST)


@shared_task(name="hypha.aggregate", base=HyphaTask, bind=True)
def aggregate(self: HyphaTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Apply one DiLoCo round's outer step and publish the next global model version."""
    return run_task(self, kwargs, args=args, validate=lambda ctx: validate_aggregate(ctx, args, kwargs), body=_run)
