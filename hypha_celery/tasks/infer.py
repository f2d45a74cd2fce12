"""``hypha.infer``: run a stored model on inputs (batched with concurrent requests for it)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from hypha_celery.manifest import expected_size
from hypha_celery.stages.validation import InferSpec, check_infer_payload, validate_infer
from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.pipeline import Run, model_under_lease, package_inferred, run_task, sized

__all__ = ["infer"]


def _run(run: Run, spec: InferSpec) -> dict[str, Any]:
    ctx = run.ctx
    manifest = model_under_lease(run, spec, lambda manifest: check_infer_payload(
        manifest, spec.kind, spec.inputs, ctx.config.security.max_input_bytes, ctx.config.security.max_text_bytes))
    with run.executor_span() as call:
        item = ctx.executors.infer(
            model=spec.model,
            inputs=spec.inputs,
            lease=run.lease,
            timeout=run.remaining_s,
            batchable=manifest.batchable,
            expected_size=expected_size(manifest, "cuda" if run.lease.gpus else "cpu"),
            family=manifest.adapter_of.id if manifest.adapter_of is not None else None,
        )
        call.set("hypha.batch_size", item.batch_size)
        call.set("hypha.cache_hit", item.cache_hit)
    return package_inferred(run, spec.model, item, batch_size=item.batch_size)


@shared_task(name="hypha.infer", base=HyphaTask, bind=True)
def infer(self: HyphaTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``model`` on ``inputs``, ``texts`` or ``images``.

    ``infer.delay(model="mlp", inputs=[[5.1, 3.5, 1.4, 0.2]])``;
    ``infer.delay(model="all-minilm-l6-v2", texts=["a sentence", "another"])``.
    """
    return run_task(
        self,
        kwargs,
        args=args,
        validate=lambda ctx: sized(ctx, validate_infer(ctx.config, ctx.store, args, kwargs), kwargs.get("requirements")),
        body=_run,
    )
