"""A DiLoCo inner task: ``hypha.train`` with a ``diloco`` block, one worker's inner steps of a round.

``diloco = {"job": J, "round": R, "inner_steps": H}`` (or ``"inner_seconds": T``: as many steps as fit in T
seconds of training, ``inner_steps`` then a cap; optional ``compression``, ``error_feedback``, ``final``:
:mod:`.compression`; ``adapter`` and ``adapter_sha256``: a LoRA job's round, ``method="lora"`` continuing that
stored adapter of ``model``, the delta its tensors only) turns a full fine-tune of
``model`` (the round's global version, fetched from the shared storage like
from any model source, and pinned by the envelope's ``model_sha256`` from the
second round on) into an inner task: it trains ``H`` optimizer steps on its
shard exactly as ``hypha.train`` does (:mod:`hypha_celery.training.job`; the
executor and its limits unchanged), then, in the worker's process, writes the
pseudo-gradient ``base - trained`` (:mod:`.deltas`) to its delta key
(:func:`.layout.delta_key`) in the shared storage (once per task id: a copy
keeps what the first run wrote) and drops the trained entry from the local
store. The result carries the delta's key, sha256 and size, the sample count
and the losses: a few hundred bytes through the result backend, never the
tensors. The task module (:mod:`hypha_celery.tasks.diloco`) only wires this.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hypha_celery.errors import InvalidTask
from hypha_celery.formats.safetensors import read_header
from hypha_celery.manifest import validate_model_id
from hypha_celery.models.shared_storage import SharedStorage, Stored
from hypha_celery.resources.requirements import Requirements
from hypha_celery.stages.validation import TrainSpec, check_model_pin
from hypha_celery.training.distributed import layout
from hypha_celery.training.distributed.compression import COMPRESSIONS, Residuals, write_delta
from hypha_celery.training.distributed.deltas import pseudo_gradient
from hypha_celery.training.distributed.weights import Weights, weight_files
from hypha_celery.training.job import TaskRun, run_training, validate_training
from hypha_celery.units import env_seconds
from hypha_celery.worker.context import NodeContext

__all__ = ["DilocoBlock", "InnerSpec", "parse_block", "publish_delta", "run_inner", "validate_inner"]

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
MAX_ROUNDS = 100_000
MAX_INNER_SECONDS = 86_400.0
TIMEBOX_STEP_CAP = 10_000_000  # a time-boxed round without inner_steps: the clock stops it, not this
# A test hook: seconds a worker started with this variable sleeps after each optimizer step of an inner task (a slow
# machine on demand). Read by the worker process only; tests set it on one worker.
STEP_DELAY_ENV = "HYPHA_TEST_STEP_DELAY_S"
_KEYS = ("job", "round", "inner_steps", "inner_seconds", "compression", "error_feedback", "final", "adapter",
         "adapter_sha256")
# Arguments the block decides: the steps are the inner steps, the trained entry is the task's own.
_DECIDED = ("max_steps", "epochs", "new_model", "lora", "merge")


@dataclass(frozen=True)
class DilocoBlock:
    """The checked ``diloco`` kwarg of ``hypha.train``."""

    job: str
    round: int
    inner_steps: int | None
    inner_seconds: float | None = None
    compression: str = "none"
    error_feedback: bool = True
    final: bool = False
    adapter: str | None = None  # a LoRA job: the round's global adapter (of ``model``), continued and differenced
    adapter_sha256: str | None = None  # its manifest sha256, as the scheduler published it

    @property
    def max_steps(self) -> int:
        """The optimizer steps the run may take: ``inner_steps``, or with a time box alone a cap the clock beats."""
        return self.inner_steps if self.inner_steps is not None else TIMEBOX_STEP_CAP

    def delta_key(self, task_id: str) -> str:
        return layout.delta_key(self.job, self.round, task_id)

    def trained_id(self, task_id: str) -> str:
        return layout.trained_id(self.job, self.round, task_id)


def publish_delta(storage: SharedStorage, key: str, path: Path) -> Stored:
    """Write the delta at ``key``, unless a run of the same task id wrote it already: then that one stays, and its
    sha256 and size are this run's. A copy of an inner task (redelivered while the first run was still finishing)
    must not replace bytes whose sha256 the first run may already have reported: the outer step would refuse them
    as tampered."""
    if storage.exists(key):
        return storage.get_file(key, path.with_name(f"{path.name}.stored"))
    return storage.put_file(key, path)


def parse_block(raw: Any) -> DilocoBlock:
    """The ``diloco`` kwarg, each field checked by name (``InvalidTask``)."""
    if not isinstance(raw, Mapping):
        raise InvalidTask(f"diloco must be an object with job, round and inner_steps, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise InvalidTask(f"diloco got an unknown key {unknown[0]!r} (it takes {', '.join(_KEYS)})")
    job = raw.get("job")
    if not isinstance(job, str) or not JOB_ID.match(job):
        raise InvalidTask(f"diloco.job must be 1-64 characters of [A-Za-z0-9_-], got {job!r}")
    numbers: dict[str, int | None] = {}
    for name, high in (("round", MAX_ROUNDS), ("inner_steps", 10_000_000)):
        value = raw.get(name)
        if name == "inner_steps" and value is None and raw.get("inner_seconds") is not None:
            numbers[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise InvalidTask(f"diloco.{name} must be an integer from 1 to {high}, got {value!r}")
        numbers[name] = value
    seconds = raw.get("inner_seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not 0 < seconds <= MAX_INNER_SECONDS):
        raise InvalidTask(f"diloco.inner_seconds must be a number above 0 and at most {MAX_INNER_SECONDS:g}, "
                          f"got {seconds!r}")
    compression = raw.get("compression", "none")
    if compression not in COMPRESSIONS:
        raise InvalidTask(f"diloco.compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    for flag in ("error_feedback", "final"):
        if not isinstance(raw.get(flag, False), bool):
            raise InvalidTask(f"diloco.{flag} must be true or false, got {raw.get(flag)!r}")
    adapter, adapter_sha256 = raw.get("adapter"), raw.get("adapter_sha256")
    if adapter is not None:
        adapter = validate_model_id(adapter)
    if adapter_sha256 is not None and (adapter is None or not isinstance(adapter_sha256, str)
                                       or len(adapter_sha256) != 64):
        raise InvalidTask(f"diloco.adapter_sha256 must be 64 hex characters pinning diloco.adapter, got "
                          f"{adapter_sha256!r}")
    round_ = numbers["round"]
    assert round_ is not None
    return DilocoBlock(job=job, round=round_, inner_steps=numbers["inner_steps"],
                       inner_seconds=None if seconds is None else float(seconds), compression=compression,
                       error_feedback=raw.get("error_feedback", True), final=raw.get("final", False),
                       adapter=adapter, adapter_sha256=adapter_sha256)


@dataclass(frozen=True)
class InnerSpec:
    """A validated inner task: the ``hypha.train`` spec it runs and its block."""

    train: TrainSpec
    block: DilocoBlock

    @property
    def requirements(self) -> Requirements:
        return self.train.requirements

    @property
    def finished(self) -> Any:
        return self.train.finished


def validate_inner(ctx: NodeContext, args: tuple[Any, ...], kwargs: dict[str, Any], task_id: str) -> InnerSpec:
    """Check the block and what it decides, then validate and size the ``hypha.train`` it runs."""
    block = parse_block(kwargs["diloco"])
    ctx.storage()
    decided = sorted(set(kwargs) & set(_DECIDED) - ({"lora"} if block.adapter is not None else set()))
    if decided:
        raise InvalidTask(f"{decided[0]} is decided by the diloco block (inner_steps, a full fine-tune or its "
                          "adapter); drop it")
    method = kwargs.get("method", "full")
    if method != ("full" if block.adapter is None else "lora"):
        raise InvalidTask("DiLoCo averages full weights (method 'full'), or a LoRA job's adapter (method 'lora' with "
                          f"diloco.adapter); got method {method!r}"
                          + ("" if block.adapter is None else " with an adapter"))
    plain = {key: value for key, value in kwargs.items() if key != "diloco"}
    plain.update(max_steps=block.max_steps, new_model=block.trained_id(task_id))
    spec = validate_training(ctx, args, plain, task_id)
    if spec.finetune is None:
        raise InvalidTask(f"model {spec.model!r} is a built-in model: DiLoCo trains transformers models")
    timed = replace(spec.finetune, max_seconds=block.inner_seconds, step_delay_s=env_seconds(STEP_DELAY_ENV, 60),
                    adapter=block.adapter)
    return InnerSpec(train=replace(spec, finetune=timed), block=block)


def run_inner(run: TaskRun, spec: InnerSpec) -> dict[str, Any]:
    """Train as ``hypha.train`` does, publish ``base - trained`` as the task's delta, answer with its report.

    The base is the round's global version: the model, or with ``diloco.adapter`` the job's adapter (fetched from
    the shared storage and checked against its pin before the executor continues it): the delta is then the
    adapter's tensors only. Either may be one file or a sharded model, read tensor by tensor."""
    ctx, block, base = run.ctx, spec.block, spec.train.model
    if block.adapter is not None:
        ctx.store.open(block.adapter)  # here before the executor (no network) looks for it
        check_model_pin(ctx.store, block.adapter, block.adapter_sha256)
    result = run_training(run, spec.train)
    output = result["output"]
    trained = output["model_id"]
    key = block.delta_key(run.task.request.id)
    try:  # the trained entry only serves to compute the delta: it leaves the store whatever happens
        base_entry, trained_entry = ctx.store.open(block.adapter or base), ctx.store.open(trained)
        base_sha256 = base_entry.sha256
        base_bytes = sum(base_entry.file(name).stat().st_size for name in weight_files(base_entry))
        with tempfile.TemporaryDirectory(prefix="hypha-delta-") as scratch:
            delta = Path(scratch) / "delta.safetensors"
            residuals = Residuals.under(ctx.store.root) if block.error_feedback else None
            feedback = write_delta(pseudo_gradient(Weights.of(base_entry), Weights.of(trained_entry)), delta,
                                   {"job": block.job, "round": str(block.round), "base_sha256": base_sha256},
                                   block.compression, residuals=residuals, job=block.job, final=block.final)
            stored = publish_delta(ctx.storage(), key, delta)
            parameters = read_header(delta).parameters
    finally:
        ctx.store.remove(trained)
    curve = output.get("loss_curve") or [output["final_loss"]]
    report = {
        "job": block.job, "round": block.round, "ref": key, "sha256": stored.sha256, "bytes": stored.size,
        "samples": output["samples"], "loss": output["final_loss"], "start_loss": curve[0],
        "base": block.adapter or base, "base_sha256": base_sha256, "base_bytes": base_bytes,
        "worker": run.worker, "steps": output["steps"], "parameters": parameters,
        # From the task's start here to its delta published: fetching the round's version, training, the delta.
        "seconds": round(time.time() - run.timing.started_at, 3) if run.timing.started_at else None,
        "compression": block.compression, "train_s": (output.get("metrics") or {}).get("train_s"), **feedback,
    }
    result["output"] = {**output, "model_id": None, "diloco": report}
    result["model_id"] = None
    return result
