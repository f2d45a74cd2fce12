"""The worker's side of the executors: which executor runs a task, kept warm, its cache accounted.

Inference runs in one long-lived *serving* executor per device ("cpu",
"cuda:0", ...), fed by one *lane*: a thread that takes batches off the device's
queue (what runs together and when is :mod:`hypha_celery.executor.batching`'s
decision) and runs them one at a time. The executor keeps the model cache warm
across tasks, and because every task of the worker that wants that device goes
through it, a cold model is loaded once (single-flight). Text generation runs
there too, on the same cache, streaming each text back as it grows: with
``[worker.generation] batching = "continuous"`` (the default) each generation is
*submitted* (:meth:`~hypha_celery.executor.process.ExecutorProcess.submit`) and
joins the executor's running batch at its next decode step
(:mod:`hypha_celery.executor.continuous`); the lane does not wait for it, so any
number are in flight, each answered by its id, each with its own deadline (past
it the row is cancelled in the executor): :mod:`hypha_celery.executor.inflight` keeps them. Proofs and LoRA adapters keep the
static batches below (:func:`~hypha_celery.executor.batching.continuous`). Requests for
different LoRA adapters of one base (and for the base itself) share a batch:
each row runs with its own adapter (peft's mixed-batch forward,
:mod:`hypha_celery.runtimes.transformers_generation`). Training and DiLoCo's outer step run in *job*
executors, reused between jobs but holding no cache, since training changes the
weights.

Each executor is an :class:`~hypha_celery.executor.process.ExecutorProcess`
(a fresh interpreter, its deadline enforced there); one that was killed is
replaced on the next job. The lanes report each cache's bytes to the ledger,
and :meth:`ExecutorPool.holds` answers sizing's "is this model already held".
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hypha_celery import errors
from hypha_celery.executor.batching import (
    Batcher,
    BatchPolicy,
    BatchQueue,
    continuous,
    generation_key,
    infer_key,
    mixed_models,
    retry_groups,
)
from hypha_celery.executor.inflight import InFlight
from hypha_celery.executor.process import START_TIMEOUT_S, ExecutorProcess, ExecutorSettings, error_from_reply
from hypha_celery.executor.requests import KILLED, GeneratedItem, ItemResult, Request, job_limits
from hypha_celery.protocol import (
    Describe,
    Description,
    Error,
    GenerateResult,
    InferResult,
    Load,
    Loaded,
    Stepped,
    TrainResult,
)
from hypha_celery.resources.ledger import Lease
from hypha_celery.work import Generate, Infer, OuterStep, Progress, Streamed, Train

__all__ = ["ExecutorPool"]

log = logging.getLogger(__name__)
_J = TypeVar("_J", TrainResult, Stepped)


def device_key(lease: Lease) -> str:
    return f"cuda:{lease.cuda_visible_devices}" if lease.gpus else "cpu"


class _Lane(InFlight):
    """The serving executor for one device and the thread that feeds it batches.

    The generations it keeps in flight (continuous batching) are :class:`~hypha_celery.executor.inflight.InFlight`'s.
    """

    pool: ExecutorPool

    def __init__(self, pool: ExecutorPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.executor: ExecutorProcess | None = None
        self.pending: Batcher[Request] = BatchQueue(pool.policy)
        self.cond = threading.Condition()  # guards ``pending``; a submit wakes the thread
        self.cache: dict[str, int] = {}
        self.warm = False  # started at boot: kept running (restarted in the background if it dies)
        self.calling = threading.Lock()  # one request on the executor's socket at a time
        self.cache_lock = threading.Lock()  # the cache is reported from the lane and from the executor's reader
        self.inflight: dict[int, tuple[Request, ExecutorProcess]] = {}
        self.overdue: dict[int, tuple[float, ExecutorProcess]] = {}
        self.tags = 0
        self.adapted: set[str] = set()  # bases whose LoRA adapters this lane has served
        self.thread = threading.Thread(target=self._run, name=f"hypha-batcher-{key}", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        with self.cond:
            self.pending.push(request, request.key)
            self.cond.notify()

    def _take_batch(self) -> list[Request] | None:
        """The next batch once it is due (at once when the pool closes); None when closed and drained.

        While generations are in flight, it wakes at least every 0.1 s to end those past their deadline.
        """
        with self.cond:
            while True:
                self._check_deadlines()
                due_in = self.pending.due_in()
                wait = 0.1 if self.inflight or self.overdue else 0.5
                if due_in is None:
                    if self.pool.closed:
                        return None
                    self.cond.wait(wait)
                elif due_in <= 0 or self.pool.closed:
                    return [r for r in self.pending.pop() if not r.cancelled]
                else:
                    self.cond.wait(min(due_in, wait))

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                if len(batch) == 1 and batch[0].submitted:
                    self._submit(batch[0])
                    continue
                if not batch:
                    continue
                with self.calling:
                    self._execute(batch)
            except BaseException as exc:  # never lose a request: each gets an answer
                log.exception("batch on %s failed", self.key)
                for request in batch:
                    if not request.done.is_set():
                        request.finish(error=exc)

    def _ensure_executor(self) -> ExecutorProcess:
        if self.executor is None or not self.executor.alive:
            if self.executor is not None:
                self.executor.close()
                self._cache_changed({})
            self.executor = ExecutorProcess(f"serve-{self.key.replace(':', '')}", self.pool.settings, self.key)
        return self.executor

    def _execute(self, batch: list[Request]) -> None:
        timeout = max(r.deadline for r in batch) - time.monotonic()
        if timeout <= 0:
            for request in batch:
                request.finish(error=errors.TaskTimeout("the task's task_timeout passed while it waited for its model"))
            return
        executor = self._ensure_executor()
        if batch[0].generate is not None:
            self._generate(executor, batch, batch[0].generate, timeout)
            return
        job = Infer(
            model=batch[0].model,
            items=[r.inputs for r in batch],
            expected_size=batch[0].expected_size,
            limits=job_limits([r.lease for r in batch], self.pool.settings),
            models=mixed_models([r.model for r in batch]),
        )
        try:
            reply = executor.call(job, InferResult, timeout)
        except errors.HyphaError as exc:
            self._failed(batch, exc, self._execute)
            return
        usage = reply.usage
        self._cache_changed(reply.cache)  # before any answer: a task that follows sees the model as held
        for index, (request, output, error) in enumerate(zip(batch, reply.outputs, reply.errors, strict=True)):
            if error is not None:
                request.finish(error=error_from_reply(error, executor.name))
                continue
            # One load serves the whole batch: the first request missed, the rest share it.
            loaded_here = index == 0 and not reply.cache_hit
            request.finish(ItemResult(
                output=output,
                cache_hit=not loaded_here,
                load_s=reply.load_s if loaded_here else 0.0,
                compute_s=reply.compute_s,
                batch_size=reply.batch_size,
                memory_peak=usage.memory_peak,
                device=usage.device,
                cpu_affinity=usage.cpu_affinity,
                gpu_memory_peak=usage.gpu_memory_peak,
            ))

    def _generate(self, executor: ExecutorProcess, batch: list[Request], job: Generate, timeout: float) -> None:
        prompts = [prompt for request in batch for prompt in request.generate.prompts]  # type: ignore[union-attr]
        models = [request.model for request in batch for _ in request.generate.prompts]  # type: ignore[union-attr]
        job = dataclasses.replace(job, model=batch[0].model, prompts=prompts, models=mixed_models(models),
                                  limits=job_limits([r.lease for r in batch], self.pool.settings))

        def route(update: Progress | Streamed) -> None:
            if isinstance(update, Streamed) and 0 <= update.index < len(batch):
                batch[update.index].stream(update)

        try:
            reply = executor.call(job, GenerateResult, timeout, route)
        except errors.HyphaError as exc:
            self._failed(batch, exc, lambda group: self._generate(self._ensure_executor(), group, job, timeout))
            return
        self._cache_changed(reply.cache)  # before any answer: a task that follows sees the model as held
        for index, (request, output, error) in enumerate(zip(batch, reply.outputs, reply.errors, strict=True)):
            if error is not None or output is None:
                request.finish(error=error_from_reply(error or Error("ExecutorCrashed", "no output"), executor.name))
                continue
            loaded_here = index == 0 and not reply.cache_hit
            request.generated = GeneratedItem(
                output=output,
                time_to_first_token_s=reply.time_to_first_token_s,
                compute_s=reply.compute_s,
                cache_hit=not loaded_here,
                load_s=reply.load_s if loaded_here else 0.0,
                batch_size=len(batch),
                usage=reply.usage,
                dtype=reply.dtype,
            )
            request.finish()

    def _failed(self, batch: list[Request], error: errors.HyphaError, run: Callable[[list[Request]], None]) -> None:
        """A batch that failed as one: run its groups again (:func:`retry_groups`), or give each request the error."""
        if isinstance(error, KILLED):
            self._cache_changed({})  # the executor was killed: its cache is gone
        groups = retry_groups(batch, error, lambda request: request.model)
        for group in groups:
            run(group)
        if not groups:
            for request in batch:
                request.finish(error=error)

    def _cache_changed(self, cache: dict[str, int]) -> None:
        """Report the cache's bytes (to the ledger); a failure is retried at the next change."""
        with self.cache_lock:
            self._report_cache(cache)

    def _report_cache(self, cache: dict[str, int]) -> None:
        if cache != self.cache:
            evicted = len(set(self.cache) - set(cache))
            if self.pool.on_cache_change is not None:
                try:
                    self.pool.on_cache_change(self.key, sum(cache.values()), evicted)
                except Exception as exc:
                    log.warning("could not account the %s model cache in the ledger: %s", self.key, exc)
                    return
            self.cache = dict(cache)

    def close(self) -> None:
        with self.cond:
            self.cond.notify_all()
        if self.executor is not None:
            self.executor.kill()


def _training_progress(
    on_progress: Callable[[Progress], None] | None,
) -> Callable[[Progress | Streamed], None] | None:
    if on_progress is None:
        return None

    def report(update: Progress | Streamed) -> None:
        if isinstance(update, Progress):
            on_progress(update)

    return report


class ExecutorPool:
    """All executors of one worker process. Thread-safe."""

    def __init__(
        self,
        settings: ExecutorSettings,
        on_cache_change: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = BatchPolicy.uniform(settings.max_batch_size, settings.max_queue_delay_s)
        self.on_cache_change = on_cache_change
        self.closed = False
        self._lanes: dict[str, _Lane] = {}
        self._idle_jobs: dict[str, list[ExecutorProcess]] = {}
        self._lock = threading.Lock()

    def _lane(self, key: str) -> _Lane:
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane(self, key)
            return lane

    def infer(
        self,
        *,
        model: str,
        inputs: Any,
        lease: Lease,
        timeout: float,
        batchable: bool,
        expected_size: int | None = None,
        family: str | None = None,
    ) -> ItemResult:
        """Run one task's inference (possibly batched with others); blocks until done.

        ``family``: an adapter's base id (or a base's own id), so requests for adapters of one base share a batch.
        """
        if self.closed:
            raise errors.ExecutorCrashed("the worker is shutting down")
        request = Request(model, inputs, lease, time.monotonic() + timeout, infer_key(model, family, batchable),
                           expected_size)
        self._lane(device_key(lease)).submit(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def generate(
        self,
        job: Generate,
        *,
        lease: Lease,
        timeout: float,
        on_progress: Callable[[Streamed], None] | None = None,
        family: str | None = None,
    ) -> GeneratedItem:
        """Run one task's generation (possibly batched with others) on the serving executor of the lease's device.

        Blocks until done. It joins the executor's running batch (continuous batching) unless the
        worker batches statically or :func:`~hypha_celery.executor.batching.continuous` says no.

        ``on_progress`` gets every report, in order, in the calling thread (a Celery task's state
        belongs to its own thread) as soon as it comes (each carries the tokens since the one before).
        """
        if self.closed:
            raise errors.ExecutorCrashed("the worker is shutting down")
        lane = self._lane(device_key(lease))
        if family is not None:
            lane.adapted.add(family)
        # A base whose adapters this lane has served runs statically, in its adapters' batches (the executor sends
        # a base with adapters attached down the static path anyway).
        submitted = (self.settings.generation_batching == "continuous" and continuous(job.params, family)
                     and job.model not in lane.adapted)
        request = Request(job.model, None, lease, time.monotonic() + timeout,
                           None if submitted else generation_key(job.model, family, job.params), job.expected_size,
                           generate=job, submitted=submitted)
        lane.submit(request)
        try:
            while True:
                try:
                    update = request.updates.get(timeout=1.0)  # a bounded wait stays open to the task's signals
                except queue.Empty:
                    continue
                if update is None:
                    break
                if on_progress is not None:
                    try:
                        on_progress(update)
                    except Exception as exc:  # progress is advisory: keep waiting for the result
                        log.warning("progress report failed: %s", exc)
        except BaseException:  # the task was interrupted (revoked, a time limit): its row ends in the executor too
            if submitted:
                lane.cancel(request)
            raise
        if request.error is not None:
            raise request.error
        assert request.generated is not None
        return request.generated

    def run_job(
        self,
        job: Train,
        *,
        lease: Lease,
        timeout: float,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> TrainResult:
        """Run a training job in a job executor of the lease's device, under the lease's limits."""
        return self._in_job_executor(job, TrainResult, lease, timeout, _training_progress(on_progress))

    def run_outer(self, step: OuterStep, *, lease: Lease, timeout: float) -> Stepped:
        """Run a DiLoCo outer step in a job executor, under the lease's limits (its memory cap among them)."""
        return self._in_job_executor(step, Stepped, lease, timeout, None)

    def _in_job_executor(self, job: Train | OuterStep, expect: type[_J], lease: Lease, timeout: float,
                         on_progress: Callable[[Progress | Streamed], None] | None) -> _J:
        key = device_key(lease)
        with self._lock:
            idle = self._idle_jobs.setdefault(key, [])
            executor = idle.pop() if idle else None
        if executor is None or not executor.alive:
            executor = ExecutorProcess(f"job-{key.replace(':', '')}", self.settings, key, trains=True)
        job = dataclasses.replace(job, limits=job_limits([lease], self.settings))
        try:
            result = executor.call(job, expect, timeout, on_progress)
        except errors.HyphaError as exc:
            # A reply ended the job (an error reply): the executor is ready for the next one,
            # unless it was killed (timeout, crash, memory watchdog).
            if isinstance(exc, (errors.TaskTimeout, errors.ExecutorCrashed, errors.MemoryLimitExceeded)):
                executor.kill()
            else:
                self._give_back(key, executor)
            raise
        except BaseException:
            executor.kill()  # the job may still be running: never hand this executor to another task
            raise
        self._give_back(key, executor)
        return result

    def _give_back(self, key: str, executor: ExecutorProcess) -> None:
        with self._lock:
            if self.closed or not executor.alive:
                executor.close()
            else:
                self._idle_jobs.setdefault(key, []).append(executor)

    def describe(self, device: str = "cpu") -> Description:
        """Start (if needed) the serving executor of ``device`` and report what it is allowed."""
        lane = self._lane(device)
        with lane.calling:
            return lane._ensure_executor().call(Describe(), Description, START_TIMEOUT_S)

    def holds(self, model: str, *, gpu: bool, gpu_count: int = 1) -> bool:
        """Whether every serving executor a one-device request could land on already holds ``model``.

        Sizing leaves a held model's weights out of a request's reservation (the
        cache's own ledger account counts them); unsure means no.
        """
        with self._lock:
            caches = {key: lane.cache for key, lane in self._lanes.items()}
        if not gpu:
            return model in caches.get("cpu", {})
        holding = [key for key, cache in caches.items() if key.startswith("cuda:") and "," not in key and model in cache]
        return gpu_count > 0 and len(holding) >= gpu_count

    def prewarm(self, device: str, preload: Sequence[tuple[str, int | None]] = ()) -> dict[str, float]:
        """Start ``device``'s serving executor now (torch imported) and load ``preload`` (model, expected bytes).

        The worker calls this at boot, before it takes tasks, so the first request is not a cold
        one; the lane is then kept warm (:meth:`keep_warm`). Returns each loaded model's load seconds;
        a model that fails to load is logged and skipped (the worker still serves).
        """
        lane = self._lane(device)
        lane.warm = True
        loaded: dict[str, float] = {}
        with lane.calling:
            executor = lane._ensure_executor()
            for model, expected in preload:
                try:
                    reply = executor.call(Load(model=model, expected_size=expected), Loaded, START_TIMEOUT_S)
                except errors.HyphaError as exc:
                    log.error("[worker.models] preload: %s could not be loaded on %s: %s", model, device, exc)
                    if not executor.alive:
                        lane._cache_changed({})
                        executor = lane._ensure_executor()
                    continue
                loaded[model] = reply.load_s
                lane._cache_changed(reply.cache)
        return loaded

    def keep_warm(self) -> None:
        """Restart, in the background, a prewarmed serving executor that died while idle."""
        with self._lock:
            lanes = [lane for lane in self._lanes.values() if lane.warm]
        for lane in lanes:
            if lane.executor is not None and lane.executor.alive:
                continue
            if not lane.calling.acquire(blocking=False):
                continue  # a request is (re)starting it already

            def restart(lane: _Lane = lane) -> None:
                try:
                    if not self.closed:
                        lane._ensure_executor()
                except errors.HyphaError as exc:
                    log.warning("could not restart the %s serving executor: %s", lane.key, exc)
                finally:
                    lane.calling.release()

            threading.Thread(target=restart, name=f"hypha-rewarm-{lane.key}", daemon=True).start()

    def cache(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {key: dict(lane.cache) for key, lane in self._lanes.items()}

    def close(self) -> None:
        self.closed = True
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
            idle, self._idle_jobs = [e for group in self._idle_jobs.values() for e in group], {}
        for lane in lanes:
            lane.close()
        for executor in idle:
            executor.kill()
