"""``hypha.verify``: replay a generation's prefill on this worker and accept or reject its proof.

A generation asked with ``proof=True`` carries a commitment to its last hidden states
(:mod:`hypha_celery.runtimes.proofs`); this task, sent to another worker holding the same model,
runs one forward pass over the prompt the client sent and the proof's tokens and answers
``{"accepted", "reason", "stats"}``. A proof for another model or another manifest is rejected
before any pass. It runs on the serving executor like ``hypha.infer`` (the model stays cached).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import shared_task

from hypha_celery.manifest import compute_dtype
from hypha_celery.stages.results import package
from hypha_celery.stages.sizing import prompt_token_bound
from hypha_celery.stages.validation import VerifySpec, check_generate_model, validate_verify
from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.pipeline import Run, model_under_lease, package_inferred, run_task, sized
from hypha_celery.worker.context import NodeContext

__all__ = ["verify"]


def _validate(ctx: NodeContext, args: Sequence[Any], kwargs: dict[str, Any]) -> VerifySpec:
    """Validate, then size ``"auto"`` requirements: weights plus the activations of prompt and generated tokens."""
    spec = validate_verify(ctx.config, ctx.store, args, kwargs)
    return sized(ctx, spec, kwargs.get("requirements"), lambda manifest: prompt_token_bound(
        spec.prompt, spec.messages, manifest.max_length) + len(spec.proof.tokens))


def _run(run: Run, spec: VerifySpec) -> dict[str, Any]:
    ctx = run.ctx
    manifest = model_under_lease(run, spec, lambda manifest: check_generate_model(
        ctx.store, manifest, spec.messages is not None))
    proof = spec.proof
    sha256 = ctx.store.manifest_sha256(spec.model)
    mismatch = (f"the proof names model {proof.model!r}, not {spec.model!r}" if proof.model not in (None, spec.model)
                else f"the proof names manifest {proof.manifest_sha256}, this worker's {spec.model!r} is {sha256}"
                if proof.manifest_sha256 not in (None, sha256) else None)
    if mismatch is not None:
        run.finished(spec.model, cache_hit=True, batch_size=1)
        return package(output={"accepted": False, "reason": mismatch, "stats": {}}, model=spec.model,
                       worker=run.worker, lease=run.lease, timing=run.timing, load_s=0.0, cache_hit=True,
                       memory_peak=0, device="none", gpu_utilization={}, extra={"manifest_sha256": sha256})
    with run.executor_span():
        item = ctx.executors.infer(
            model=spec.model,
            inputs={"verify": {"prompt": spec.prompt, "messages": spec.messages, "proof": proof.to_json()}},
            lease=run.lease,
            timeout=run.remaining_s,
            batchable=False,
            expected_size=manifest.weights_bytes_at(compute_dtype("cuda" if run.lease.gpus else "cpu")),
            family=manifest.adapter_of.id if manifest.adapter_of is not None else None,
        )
    return package_inferred(run, spec.model, item, manifest_sha256=sha256)


@shared_task(name="hypha.verify", base=HyphaTask, bind=True)
def verify(self: HyphaTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Check a generation's ``proof`` against ``model`` run on ``prompt`` (or ``messages``).

    ``verify.delay(model="tiny-llama", prompt="Once upon a time", proof=result["output"]["proof"])``.
    """
    return run_task(
        self,
        kwargs,
        args=args,
        validate=lambda ctx: _validate(ctx, args, kwargs),
        body=_run,
    )
