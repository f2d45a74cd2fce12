"""The serving executor's running batches: submitted generations join a decode loop at its next step.

The worker sends each generation of a transformers causal LM as a :class:`~hypha_celery.protocol.Submit`
(one prompt, an id); the executor's main loop (:meth:`~hypha_celery.executor.child.Executor.serve`)
hands it here between two steps, and steps every busy engine while no request is waiting.
A request joins the :class:`~hypha_celery.serving.engine.Engine` of its model (one per model,
created on its first request, its model pinned in the cache while it has rows) and leaves the
step it ends; its :class:`~hypha_celery.work.Streamed` reports and its one-prompt
:class:`~hypha_celery.protocol.GenerateResult` go back wrapped in :class:`~hypha_celery.protocol.Tagged`
(its id), the shapes a static batch of one sends, so the worker side reads them as it always did.

What the engine cannot serve runs on the static path (``runtimes.transformers_generation``), alone,
between two steps, its replies tagged the same way: a model the engine refuses (a sliding-window or
hybrid cache), a LoRA adapter (its rows need peft's per-row adapter forward), a base model whose
adapters are attached, ``proof`` (the lm head's inputs are captured from transformers' ``generate``),
and any model that is not a transformers text generator (the static path refuses it with its error).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from hypha_celery.errors import InvalidTask, UnsupportedModel, contained
from hypha_celery.executor import limits
from hypha_celery.executor.failures import error_reply
from hypha_celery.models.cache import ModelCache
from hypha_celery.protocol import Cancel, Error, GenerateResult, Reply, Submit, Tagged, Usage
from hypha_celery.work import Generate, Generated, JobLimits, Streamed

if TYPE_CHECKING:
    from hypha_celery.serving.engine import Engine
    from hypha_celery.serving.request import Handle

__all__ = ["Continuous", "Host", "combined_limits"]

_TEXT_GENERATION = "text-generation"


class Host(Protocol):
    """What the serving loop needs of its executor (:class:`~hypha_celery.executor.child.Executor`)."""

    cache: ModelCache

    def generate(self, request: Generate, report: Callable[[Streamed], None] | None = None) -> GenerateResult: ...

    def _pin(self, job_limits: JobLimits) -> None: ...

    def _limits(self, job_limits: JobLimits) -> AbstractContextManager[None]: ...

    def _usage(self, started_rss: int) -> Usage: ...


@dataclass(eq=False)
class _Served:
    """One model's engine and the cache pin that keeps the model loaded while the engine has rows."""

    engine: Engine
    model: Any
    pin: ExitStack
    hit: bool
    load_s: float
    dtype: str


@dataclass(eq=False)
class _Row:
    """One submitted generation inside an engine."""

    id: int
    job: Generate
    served: _Served
    handle: Handle | None = None
    started: float = field(default_factory=time.perf_counter)
    started_rss: int = 0
    first_token_s: float | None = None
    last_report: float = 0.0
    sent: int = 0
    batch: int = 1  # the most rows that decoded together while this one ran
    hit: bool = True
    load_s: float = 0.0


def combined_limits(rows: list[JobLimits]) -> JobLimits:
    """One set of limits for the rows decoding together: the sum of the memory each reserved, on the union of their
    cores, with the most threads one of them reserved.

    Threads are not summed: the rows share each forward pass, and a pass split over more threads than
    its cores give it waits at every barrier for a thread the kernel has descheduled (twelve rows of a
    tenth of a core each, summed to two threads on a busy 2-core machine, made each step ~20x slower).
    """
    cores = sorted({core for row in rows for core in row.cores or ()})
    memory = [row.memory for row in rows if row.memory is not None]
    gpu = [row.gpu_memory for row in rows if row.gpu_memory]
    threads = [row.threads for row in rows if row.threads]
    return JobLimits(memory=sum(memory) if memory else None, cores=cores or None,
                     gpu_memory=sum(gpu) if gpu else None,
                     threads=min(len(cores), max(threads)) if cores and threads else None)


class Continuous:
    """Every running engine of the executor and the submitted rows in them. Called from the executor's main thread."""

    def __init__(self, executor: Host, write: Callable[[Reply], None], *, max_rows: int,
                 prefill_budget: int = 256, prefix_cache_bytes: int = 0, step_delay_s: float = 0.0) -> None:
        self.executor = executor
        self.step_delay_s = step_delay_s
        self.write = write
        self.max_rows = max_rows
        self.prefix_cache_bytes = prefix_cache_bytes
        self.prefill_budget = prefill_budget
        self._served: dict[str, _Served] = {}
        self._rows: dict[int, _Row] = {}
        self._refused: set[str] = set()  # models the engine refused: their generations run statically
        self._limits = ExitStack()
        self._limits_key: JobLimits | None = None

    @property
    def busy(self) -> bool:
        return bool(self._rows)

    # -- requests -----------------------------------------------------------------------------------------------

    def submit(self, message: Submit) -> None:
        """Queue ``message``'s generation in its model's engine, or run it on the static path now."""
        job = message.job
        try:
            with self.executor._limits(job.limits):  # its model's load and its prompt's tokenizing, under its cap
                served = self._engine_for(job)
                if served is not None:
                    self._add(message.id, job, served)
            if served is None:
                self._static(message)
        except BaseException as exc:
            if not contained(exc):
                raise
            self.write(Tagged(message.id, error_reply(exc)))
            self._release_idle()

    def cancel(self, message: Cancel) -> None:
        row = self._rows.get(message.id)
        if row is not None and row.handle is not None:
            row.served.engine.cancel(row.handle)

    def _engine_for(self, job: Generate) -> _Served | None:
        """The engine that serves ``job``; None for the static path (the module docstring says when)."""
        if job.params.get("proof") or job.models or len(job.prompts) != 1 or job.model in self._refused:
            return None
        served = self._served.get(job.model)
        if served is not None:
            return served if not _has_adapters(served.model) else None
        pin = ExitStack()
        try:
            use = pin.enter_context(self.executor.cache.use(job.model, job.expected_size))
            model = use.value
            if (getattr(model, "task", None) != _TEXT_GENERATION or getattr(model, "tokenizer", None) is None
                    or getattr(model, "adapter", None) is not None or _has_adapters(model)):
                pin.close()
                return None
            from hypha_celery.serving.engine import Engine

            try:
                engine = Engine(model.module, model.tokenizer, prefill_budget=self.prefill_budget,
                                max_rows=self.max_rows, prefix_cache_bytes=self.prefix_cache_bytes)
            except UnsupportedModel:
                self._refused.add(job.model)
                pin.close()
                return None
        except BaseException:
            pin.close()
            raise
        served = _Served(engine, model, pin, use.hit, use.load_s, str(model.module.dtype).removeprefix("torch."))
        self._served[job.model] = served
        return served

    def _add(self, id: int, job: Generate, served: _Served) -> None:
        from hypha_celery.runtimes.transformers_generation import constraint_for
        from hypha_celery.runtimes.transformers_prompts import prompt_ids
        from hypha_celery.serving.request import Request, Sampling

        if served.model.task != _TEXT_GENERATION:
            raise InvalidTask(f"model {job.model!r} does not generate text ({served.model.task})")
        params = job.params
        row = _Row(id, job, served, started_rss=limits.current_rss(), hit=served.hit, load_s=served.load_s)
        served.hit, served.load_s = True, 0.0  # the next rows find the model loaded
        sampling = Sampling(do_sample=bool(params["do_sample"]), temperature=params["temperature"],
                            top_p=params["top_p"], top_k=params["top_k"],
                            repetition_penalty=params["repetition_penalty"], seed=params["seed"])
        prompt = job.prompts[0]
        resume = tuple(prompt.resume or ())
        if not all(isinstance(i, int) and 0 <= i < served.engine.vocab_size for i in resume):
            resume = ()  # a record no model of this vocabulary wrote: generated from the start (the result says so)
        request = Request(prompt_ids(served.model, prompt, params["max_new_tokens"]),
                          params["max_new_tokens"], sampling, stop=tuple(params["stop"]), on_token=self._token,
                          tag=id, constraint=constraint_for(served.model, prompt.response_format),
                          resume=resume, rng=prompt.rng if resume else None)
        row.handle = served.engine.add(request)
        row.sent = len(request.resume)  # the stream holds those: reports start at the seam
        self._rows[id] = row
        if row.handle.done:  # its resumed tokens already ended it
            self._finish(row)

    def _static(self, message: Submit) -> None:
        """The static path, alone, now: the rows already decoding wait for it (the cases the module names)."""
        reply = self.executor.generate(message.job, report=lambda update: self.write(Tagged(message.id, update)))
        self.write(Tagged(message.id, reply))

    # -- the loop -----------------------------------------------------------------------------------------------

    def step(self) -> None:
        """One step of every engine with rows; rows that ended send their results; idle engines let their model go."""
        self._apply_limits()
        for served in list(self._served.values()):
            if not served.engine.busy:
                continue
            if _has_adapters(served.model):  # a static adapter batch may have switched the shared base's adapter
                from hypha_celery.runtimes.transformers_adapters import activate

                activate(served.model)
            try:
                served.engine.step()
            except BaseException as exc:  # a forward pass failed: the engine ended its rows with the error
                if not contained(exc):
                    raise
            running = served.engine.running()
            for handle in running:
                row = self._rows.get(handle.request.tag)
                if row is not None:
                    row.batch = max(row.batch, len(running))
            for row in [r for r in self._rows.values() if r.served is served and r.handle is not None and r.handle.done]:
                self._finish(row)
        self._release_idle()
        if self.step_delay_s and self._rows:
            time.sleep(self.step_delay_s)

    def _apply_limits(self) -> None:
        """The rows' combined limits (pinned threads, the memory cap), re-entered only when they change."""
        wanted = combined_limits([row.job.limits for row in self._rows.values()])
        self.executor._pin(wanted)
        if wanted != self._limits_key:
            self._limits.close()
            self._limits = ExitStack()
            self._limits.enter_context(self.executor._limits(wanted))
            self._limits_key = wanted

    def _release_idle(self) -> None:
        for model_id, served in list(self._served.items()):
            if not served.engine.busy:
                del self._served[model_id]
                served.pin.close()
        if not self._rows and self._limits_key is not None:
            self._limits.close()
            self._limits_key = None

    # -- one row's reports --------------------------------------------------------------------------------------

    def _token(self, handle: Handle, token: int, delta: str) -> None:
        row = self._rows[handle.request.tag]
        now = time.perf_counter()
        if row.first_token_s is None:
            row.first_token_s = now - row.started
        if now - row.last_report >= row.job.progress_interval:
            row.last_report = now
            self._report(row, handle.emitted)

    def _report(self, row: _Row, text: str) -> None:
        handle = row.handle
        assert handle is not None
        start, row.sent = row.sent, len(handle.tokens)
        self.write(Tagged(row.id, Streamed(text=text, tokens=len(handle.tokens), ids=handle.tokens[start:],
                                           start=start, at=time.time(), rng=row.served.engine.rng_of(handle))))

    def _finish(self, row: _Row) -> None:
        from hypha_celery.serving.request import Finish

        del self._rows[row.id]
        handle = row.handle
        assert handle is not None
        compute_s = time.perf_counter() - row.started
        output: Generated | None = None
        error: Error | None = None
        if handle.finish in (Finish.STOP, Finish.LENGTH):
            self._report(row, handle.text)  # the final text, and the tokens since the last report
            output = Generated(text=handle.text, finish_reason=handle.finish.value,
                               prompt_tokens=len(handle.request.prompt_ids), completion_tokens=len(handle.tokens),
                               resumed_from=len(handle.request.resume), reseeded=handle.reseeded)
        elif handle.finish is Finish.CANCELLED:
            error = Error(type="ExecutionError", message="the generation was cancelled")
        else:
            error = error_reply(handle.error or RuntimeError("the row ended without a result"))
        self.write(Tagged(row.id, GenerateResult(
            outputs=[output], errors=[error],
            time_to_first_token_s=row.first_token_s if row.first_token_s is not None else compute_s,
            compute_s=compute_s, cache_hit=row.hit, load_s=row.load_s, cache=self.executor.cache.sizes(),
            usage=self.executor._usage(row.started_rss), dtype=row.served.dtype, batch_size=row.batch,
        )))


def _has_adapters(model: Any) -> bool:
    """Whether LoRA adapters are attached to ``model``'s module (its forward then depends on which is active)."""
    return bool(getattr(getattr(model, "module", None), "_hf_peft_config_loaded", False))
