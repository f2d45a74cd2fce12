"""What ``hypha.train`` does around the executor: sizing, the run, checkpoints copied and discarded.

A built-in model trains on ``inputs``/``targets``; a transformers model (causal LM or text
classifier) trains full or LoRA on ``texts`` (:mod:`hypha_celery.training.finetune`), its
``"auto"`` memory sized for training (:func:`validate_training`, :mod:`hypha_celery.stages.sizing`).
While it runs the task's ``PROGRESS`` state carries step, epoch, loss, percent (and for transformers
tokens/s and ETA) at most four times a second. With ``checkpoint_every`` the executor checkpoints the
run under the task id and a redelivered copy resumes from it (:mod:`hypha_celery.training.checkpoints.local`);
with ``[worker.training] shared_storage`` the worker also copies each checkpoint there in the background
and fetches one before a run, so a copy resumes on any worker sharing the storage
(:mod:`hypha_celery.training.checkpoints.sync`). The checkpoint goes, here and there, once the task has
its answer: its model saved (by the executor, or earlier, for a copy answered from the store:
:func:`_answer_copy`, from what :func:`hypha_celery.stages.validation.finished_training` found) or the
run failed. The task module (:mod:`hypha_celery.tasks.train`) only registers and wires this; a DiLoCo
inner task (:mod:`hypha_celery.training.distributed.inner`) runs the same job, then writes its delta.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from hypha_celery.errors import InvalidTask, SharedStorageError
from hypha_celery.formats.huggingface import LORA_TARGET_MODULES
from hypha_celery.manifest import CONFIG, Manifest
from hypha_celery.models.shared_storage import SharedStorage
from hypha_celery.models.store import ModelStore
from hypha_celery.models.tensors import check_inputs
from hypha_celery.resources.ledger import Lease
from hypha_celery.stages.results import Timing, package
from hypha_celery.stages.sizing import Training, activation_bytes_per_token, lora_trainable_bound, requirements_for_model
from hypha_celery.stages.validation import (
    FinetuneParams,
    TrainSpec,
    check_model_pin,
    check_training_texts,
    finetune_params,
    validate_train,
)
from hypha_celery.training.checkpoints import local as checkpoint
from hypha_celery.training.checkpoints import sync as checkpoint_sync
from hypha_celery.work import Progress, Train, Trained
from hypha_celery.worker.context import NodeContext

__all__ = ["PROGRESS_INTERVAL_S", "TaskRun", "run_training", "validate_training"]

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25  # at most 4 PROGRESS updates a second: each is a write to the result backend


class TaskRun(Protocol):
    """What a training job uses of its task's run (:class:`hypha_celery.tasks.pipeline.Run` is one).

    Declared here so that training, which the task modules wire, imports nothing from them.
    """

    ctx: NodeContext
    task: Any  # the Celery task: its request id, and send_event
    lease: Lease
    timing: Timing
    worker: str
    model_sha256: str | None

    @property
    def remaining_s(self) -> float: ...

    def progress(self, meta: dict[str, Any]) -> None: ...


def validate_training(ctx: NodeContext, args: Sequence[Any], kwargs: dict[str, Any], task_id: str) -> TrainSpec:
    """Validate, then size a transformers model's ``"auto"`` requirements for training it."""
    spec = validate_train(ctx.config, ctx.store, args, kwargs, task_id)
    if spec.finetune is None:
        return spec
    manifest = spec.manifest or ctx.store.peek(spec.model)
    job = _training_size(ctx.store, manifest, spec.finetune, spec.batch_size)
    requirements = requirements_for_model(ctx.config, kwargs.get("requirements"), manifest, holds=ctx.holds,
                                          training=job)
    return dataclasses.replace(spec, requirements=requirements)


def _training_size(store: ModelStore, manifest: Manifest, params: FinetuneParams, batch_size: int) -> Training:
    """Trainable parameters and activations of one micro-batch, from the config when the model is here."""
    config = store.read_json(manifest.id, CONFIG) if CONFIG in manifest.files else None
    config = config if isinstance(config, dict) else None
    trainable = None
    if params.lora is not None:
        targets = params.lora.get("target_modules") or LORA_TARGET_MODULES.get(manifest.model_type or "", [])
        trainable = lora_trainable_bound(config, params.lora["r"], len(targets), len(manifest.labels or []))
    return Training(trainable=trainable, tokens=batch_size * params.max_length,
                    activation_bytes_per_token=activation_bytes_per_token(config))


def run_training(run: TaskRun, spec: TrainSpec) -> dict[str, Any]:
    """Train under the task's lease (or answer a copy whose model is saved already) and package the result."""
    if spec.finished is not None:
        return _answer_copy(run, spec, spec.finished)
    ctx = run.ctx
    data: dict[str, Any] | None = spec.data
    data_path = None
    if "ref" in spec.data:  # a stored data set: fetched and verified here, read by the executor
        run.task.send_event("task-loading", dataset=spec.data["ref"])
        _, path = ctx.store.dataset(spec.data["ref"])
        data, data_path = None, str(path)
    if spec.manifest is None:
        run.task.send_event("task-loading", model=spec.model)
        manifest = ctx.store.manifest(spec.model)
        check_model_pin(ctx.store, spec.model, run.model_sha256)
        if manifest.runtime == "transformers" and spec.finetune is None:
            raise InvalidTask(f"model {spec.model!r} is a transformers model: data takes texts, not inputs and targets")
        if spec.finetune is not None:  # checked again on the fetched manifest: its task, labels, max_length
            checked = finetune_params(_finetune_kwargs(spec.model, spec.finetune), manifest)
            spec = dataclasses.replace(spec, finetune=dataclasses.replace(
                checked, max_seconds=spec.finetune.max_seconds, step_delay_s=spec.finetune.step_delay_s,
                adapter=spec.finetune.adapter))
        if "texts" in spec.data:
            check_training_texts(spec.data["texts"], manifest, ctx.config.security.max_text_bytes)
        if "inputs" in spec.data:
            check_inputs(spec.data["inputs"], manifest.input_shape, max_bytes=ctx.config.security.max_input_bytes,
                         model=spec.model)
    run.progress({"stage": "load", "epoch": 0, "epochs": spec.epochs, "step": 0, "loss": None, "percent": 0.0})
    tuned = spec.finetune.to_json() if spec.finetune is not None else {}
    task_id = run.task.request.id
    job = Train(model=spec.model, new_model=spec.new_model, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                data=data, data_path=data_path, task_id=task_id, progress_interval=PROGRESS_INTERVAL_S, **tuned)
    shared = _shared_checkpoints(ctx, spec)
    refused = None if shared is None else _fetch_checkpoint(shared, ctx, task_id)
    uploader = None if shared is None else checkpoint_sync.Uploader(shared, ctx.store.root, task_id)

    def on_progress(update: Progress) -> None:
        if uploader is not None and update.checkpoint_step is not None:
            uploader.written()
        run.progress({"stage": "run", **update.to_json()})

    try:
        result = ctx.executors.run_job(job, lease=run.lease, timeout=run.remaining_s, on_progress=on_progress)
    except Exception:
        _discard_checkpoints(ctx, task_id, "the run failed", shared, uploader)  # a failure is this task's answer
        raise
    finally:
        if uploader is not None:
            uploader.close()
    if shared is not None:  # the executor deleted its local checkpoints once the model was saved
        _discard_checkpoints(ctx, task_id, "its model was saved", shared)
    run.timing.finished_at = time.time()
    output = {**result.trained.to_json(), "model_id": result.model_id}
    if refused is not None and output.get("checkpoint_refused") is None:
        output["checkpoint_refused"] = refused
    return package(
        output=output,
        model=spec.model,
        worker=run.worker,
        lease=run.lease,
        timing=run.timing,
        load_s=result.load_s,
        cache_hit=False,
        memory_peak=result.usage.memory_peak,
        device=result.usage.device,
        extra={"model_id": result.model_id, "cpu_affinity": result.usage.cpu_affinity},
    )


def _finetune_kwargs(model: str, finetune: FinetuneParams) -> dict[str, Any]:
    """The validated transformers arguments as task kwargs, to check them again on a fetched manifest."""
    params = finetune.to_json()
    kwargs = {key: value for key, value in params.items() if value is not None and key != "lora"}
    if params["lora"] is not None:
        kwargs["lora"] = params["lora"]
    else:
        kwargs.pop("merge")
    return {"model": model, **kwargs}


def _answer_copy(run: TaskRun, spec: TrainSpec, trained: Trained) -> dict[str, Any]:
    """A copy of this task already saved ``new_model``: its result, from what that run recorded; nothing runs."""
    log.info("task %s: model %r was saved by this task id; answering the copy from it", run.task.request.id,
             spec.new_model)
    _discard_checkpoints(run.ctx, run.task.request.id, "its model was saved earlier", run.ctx.shared_storage)
    run.timing.finished_at = time.time()
    return package(
        output={**trained.to_json(), "model_id": spec.new_model},
        model=spec.model,
        worker=run.worker,
        lease=run.lease,
        timing=run.timing,
        cache_hit=False,
        extra={"model_id": spec.new_model, "cpu_affinity": [], "saved_earlier": True},
    )


def _shared_checkpoints(ctx: NodeContext, spec: TrainSpec) -> SharedStorage | None:
    """The shared storage the task's checkpoints are copied to: with ``checkpoint_every`` and storage configured."""
    if spec.finetune is None or not spec.finetune.checkpoint_every:
        return None
    return ctx.shared_storage


def _fetch_checkpoint(shared: SharedStorage, ctx: NodeContext, task_id: str) -> str | None:
    """Bring a checkpoint another worker left in shared storage into the local store; why one was refused, or None."""
    try:
        checkpoint_sync.fetch(shared, ctx.store.root, task_id)
    except (SharedStorageError, OSError) as exc:
        # kept: the run's own uploads replace it, and a storage that was only unreachable may serve the next copy
        log.warning("task %s: shared checkpoint refused, starting without it: %s", task_id, exc)
        return f"the shared checkpoint was refused: {exc}"
    return None


def _discard_checkpoints(ctx: NodeContext, task_id: str, why: str, shared: SharedStorage | None = None,
                         uploader: checkpoint_sync.Uploader | None = None) -> None:
    """Delete what checkpoints the task left (a killed run's executor could not), here and in shared storage."""
    if uploader is not None:
        uploader.close()  # no upload may land after the delete
    if checkpoint.discard(ctx.store.root, task_id):
        log.info("task %s: checkpoints deleted (%s)", task_id, why)
    if shared is None:
        return
    try:
        if checkpoint_sync.discard(shared, task_id):
            log.info("task %s: shared checkpoint deleted (%s)", task_id, why)
    except SharedStorageError as exc:  # the task's answer stands; the copy is orphaned, and says so here
        log.warning("task %s: cannot delete its shared checkpoint: %s", task_id, exc)
