"""``hypha.train``: fine-tune a stored model and store the result as a new model."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import shared_task

from hypha_celery.executor.protocol import Train, Trained
from hypha_celery.models.tensors import check_inputs
from hypha_celery.stages.results import package
from hypha_celery.stages.validation import TrainSpec, check_model_pin, validate_train
from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.pipeline import Run, run_task

__all__ = ["train"]

log = logging.getLogger(__name__)


def _run(run: Run, spec: TrainSpec) -> dict[str, Any]:
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
        if "inputs" in spec.data:
            check_inputs(spec.data["inputs"], manifest.input_shape, max_bytes=ctx.config.security.max_input_bytes,
                         model=spec.model)
    run.progress({"stage": "load", "epoch": 0, "epochs": spec.epochs, "step": 0, "loss": None, "percent": 0.0})
    job = Train(model=spec.model, new_model=spec.new_model, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                data=data, data_path=data_path, task_id=run.task.request.id)
    result = ctx.executors.run_job(
        job,
        lease=run.lease,
        timeout=run.remaining_s,
        on_progress=lambda update: run.progress({"stage": "run", **update.to_json()}),
    )
    run.timing.finished_at = time.time()
    output = {**result.trained.to_json(), "model_id": result.model_id}
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


def _answer_copy(run: Run, spec: TrainSpec, trained: Trained) -> dict[str, Any]:
    """A copy of this task already saved ``new_model``: its result, from what that run recorded; nothing runs."""
    log.info("task %s: model %r was saved by this task id; answering the copy from it", run.task.request.id,
             spec.new_model)
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


@shared_task(name="hypha.train", base=HyphaTask, bind=True)
def train(self: HyphaTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data={"inputs": [...], "targets": [...]}`` (or ``{"ref": "<data set>"}``)."""
    return run_task(
        self,
        kwargs,
        args=args,
        validate=lambda ctx: validate_train(ctx.config, ctx.store, args, kwargs, self.request.id),
        body=_run,
    )
