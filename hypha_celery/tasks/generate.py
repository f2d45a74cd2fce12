"""``hypha.generate``: text from a stored causal language model, streamed as it grows.

It runs on the serving executor of its device, like ``hypha.infer``, so the
model stays in that executor's cache between requests; generations with the
same sampling settings that arrive together run as one batch, adapters of one base (and the base) included.
Its tokens go to the task's token stream as they come (:mod:`hypha_celery.token_stream`, read
with :func:`hypha_celery.client.stream`), at most every ``STREAM_INTERVAL_S``, and the stream ends
with the task's status. For Flower, the task's ``PROGRESS`` state still carries
``{"stage": "run", "text": <text so far>, "tokens": <count>}`` at most four times a second.
With ``proof=True`` the output carries ``proof`` (its token ids and a commitment to its
hidden states, :mod:`hypha_celery.runtimes.proofs`) that ``hypha.verify`` checks on another worker.
With ``response_format`` (OpenAI's shape, :mod:`hypha_celery.structured`) decoding is constrained to JSON or a
JSON Schema, and the text is checked against it before the task succeeds (``InvalidOutput`` otherwise).
A copy of a generation whose worker died continues after the tokens its stream holds
(:mod:`hypha_celery.stages.continuation`); its result says from which token (``resumed_from_token``),
which workers took part (``workers``) and, for a copy that had to start again, why (``restarted``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore, Reject, Retry

from hypha_celery.manifest import Manifest, compute_dtype
from hypha_celery.registry import registered_peer
from hypha_celery.stages.continuation import FIRST_RUN, Continuation, plan
from hypha_celery.stages.sizing import prompt_token_bound
from hypha_celery.stages.validation import GenerateSpec, check_generate_model, check_prompt_bytes, validate_generate
from hypha_celery.structured.response_format import check_output
from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.pipeline import Run, model_under_lease, run_task, sized
from hypha_celery.token_stream import FAILURE, SUCCESS, TokenStreamWriter
from hypha_celery.work import Generate, Generated, Prompt, Streamed
from hypha_celery.worker.context import NodeContext

__all__ = ["PROGRESS_INTERVAL_S", "STREAM_INTERVAL_S", "generate"]

PROGRESS_INTERVAL_S = 0.25  # at most 4 PROGRESS updates a second: each rewrites the whole text in the result backend
STREAM_INTERVAL_S = 0.1  # the executor reports new tokens at most 10 times a second: one XADD each


def _validate(ctx: NodeContext, args: Sequence[Any], kwargs: dict[str, Any]) -> GenerateSpec:
    """Validate, then size ``"auto"`` requirements: weights (unless held) plus the KV cache of prompt and new
    tokens, which the ledger also admits against the device's KV budget."""
    spec = validate_generate(ctx.config, ctx.store, args, kwargs)
    return sized(ctx, spec, kwargs.get("requirements"), lambda manifest: prompt_token_bound(
        spec.prompt, spec.messages, manifest.max_length) + spec.params.max_new_tokens, generation=True)


def _continuation(run: Run, spec: GenerateSpec, stream: TokenStreamWriter | None) -> Continuation:
    """Where this run starts: after what an earlier run streamed (a copy), else from the start. The stream's
    writer learns what the stream holds and names this run's worker on its first entry."""
    streams = run.ctx.token_streams
    cont = FIRST_RUN
    if run.copy and streams is not None:
        params = spec.params
        record = streams.record(run.task.request.id, params.max_new_tokens, _registered(run))
        if record is not None or run.ran_before:
            cont = plan(record, seeded_sampling=params.do_sample and params.seed is not None, resume=spec.resume)
    run.since = cont.since
    if cont.resume or cont.restarted:  # Flower shows where a moved generation picked up
        run.task.send_event("task-resumed", from_token=len(cont.resume), workers=list(cont.workers),
                            restarted=cont.restarted)
    if stream is not None:
        stream.resume(0, cont.held_text, cont.held_tokens)
        stream.begin(run.worker, cont.since or run.timing.started_at)
    return cont


def _registered(run: Run) -> Callable[[str, str], bool] | None:
    """For a worker that signs its results: whether a peer id is the identity a worker registered (the stream's
    entries must carry its signature to be continued from). None for one that does not sign: nothing to launder."""
    if run.ctx.identity is None:
        return None
    return lambda worker, peer: registered_peer(run.ctx.redis, worker) == peer


def _run(run: Run, spec: GenerateSpec, stream: TokenStreamWriter | None) -> dict[str, Any]:
    ctx = run.ctx

    def check(manifest: Manifest) -> None:  # a model fetched under the lease: what validation could not read
        check_generate_model(ctx.store, manifest, spec.messages is not None)
        check_prompt_bytes(spec.prompt, spec.messages, manifest, ctx.config.security.max_text_bytes)

    manifest = model_under_lease(run, spec, check)
    cont = _continuation(run, spec, stream)
    job = Generate(
        model=spec.model,
        params=spec.params.to_json(),
        prompts=[Prompt(prompt=spec.prompt, messages=spec.messages, response_format=spec.response_format,
                        resume=cont.resume or None, rng=cont.rng)],
        progress_interval=STREAM_INTERVAL_S,
        expected_size=manifest.weights_bytes_at(compute_dtype("cuda" if run.lease.gpus else "cpu")),
    )

    progressed = [0.0]  # when PROGRESS was last stored

    def report(update: Streamed) -> None:
        if stream is not None and stream.add(0, update.text, update.ids, update.start, update.at or None,
                                             update.rng):
            stream.flush()  # the task holds one prompt: its row 0
        now = time.monotonic()
        if now - progressed[0] >= PROGRESS_INTERVAL_S:
            progressed[0] = now
            run.progress({"stage": "run", "text": update.text, "tokens": update.tokens})

    with run.executor_span() as call:
        result = ctx.executors.generate(job, lease=run.lease, timeout=run.remaining_s, on_progress=report,
                                        family=manifest.adapter_of.id if manifest.adapter_of is not None else None)
        call.set("hypha.batch_size", result.batch_size)
        call.set("hypha.cache_hit", result.cache_hit)
        call.set("hypha.completion_tokens", result.output.completion_tokens)
    run.finished(spec.model, cache_hit=result.cache_hit, batch_size=result.batch_size)
    out = result.output
    check_output(out.text, spec.response_format, out.finish_reason)  # never SUCCESS with output off its format
    after_first = result.compute_s - result.time_to_first_token_s
    produced = out.completion_tokens - out.resumed_from  # by this run
    tokens_per_s = (produced - 1) / after_first if produced > 1 and after_first > 0 else 0.0
    usage = result.usage
    proof = {**out.proof, "model": spec.model, "manifest_sha256": ctx.store.manifest_sha256(spec.model)} \
        if out.proof is not None else None
    output = {
        "text": out.text,
        "finish_reason": out.finish_reason,
        "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens},
        **({"proof": proof} if proof is not None else {}),
    }
    packaged = run.package(output, spec.model, load_s=result.load_s, cache_hit=result.cache_hit,
                           memory_peak=usage.memory_peak, device=usage.device, gpu_memory_peak=usage.gpu_memory_peak,
                           time_to_first_token_s=result.time_to_first_token_s, tokens_per_s=tokens_per_s,
                           compute_s=result.compute_s, batch_size=result.batch_size, cpu_affinity=usage.cpu_affinity,
                           **({"dtype": result.dtype} if result.dtype is not None else {}))
    resumption = _resumption(run, cont, out)
    if out.resumed_from or "restarted" in resumption:
        ctx.metrics.generation_moved(resumed_from=out.resumed_from, restarted="restarted" in resumption)
    return {**packaged, **resumption}


def _resumption(run: Run, cont: Continuation, out: Generated) -> dict[str, Any]:
    """The result's account of earlier runs: the token this run continued from, who took part, why not (if not)."""
    fields: dict[str, Any] = {"resumed_from_token": out.resumed_from,
                              "workers": [*cont.workers, run.worker] if cont.workers[-1:] != (run.worker,)
                              else list(cont.workers)}
    if out.resumed_from == 0 and (cont.restarted or cont.resume):
        fields["restarted"] = cont.restarted or ("it ran on the static path (a LoRA adapter, static batching, a proof or"
                                                 " a sliding-window model), which continues neither a seeded sampled "
                                                 "generation nor a proof: generated from the start")
    if out.reseeded:
        fields["reseeded"] = True  # the state was another device kind's: sampled afresh from the seam
    return fields


@shared_task(name="hypha.generate", base=HyphaTask, bind=True)
def generate(self: HyphaTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate text with ``model`` from ``prompt`` or chat ``messages``.

    ``generate.delay(model="tiny-llama", prompt="Once upon a time", max_new_tokens=32)``;
    ``generate.delay(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], do_sample=True, seed=1)``;
    ``generate.delay(model="tiny-llama", prompt="A user:", response_format={"type": "json_schema", "json_schema":
    {"name": "user", "schema": {...}}})``.
    """
    streams = self.node.token_streams
    stream = streams.writer(self.request.id, getattr(self.backend, "expires", None)) \
        if streams is not None and self.request.id else None
    if stream is not None:  # named on the run's first entry, its end included (the body says when its budget began)
        stream.begin(self.request.hostname or "unknown", time.time())
    try:
        result = run_task(
            self,
            kwargs,
            args=args,
            validate=lambda ctx: _validate(ctx, args, kwargs),
            body=lambda run, spec: _run(run, spec, stream),
        )
    except (Retry, Ignore, Reject):
        raise  # it runs later, or it was a copy: the stream stays open for the run that ends it
    except Exception as exc:
        if stream is not None:
            stream.end(FAILURE, exc)
        raise
    if stream is not None:
        stream.end(SUCCESS)
    return result
