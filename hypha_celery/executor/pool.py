"""The worker's side of the executors: spawn them, batch work onto them, enforce timeouts.

Inference runs in one long-lived *serving* executor per device ("cpu",
"cuda:0", ...). It keeps the model cache warm across tasks, and because every
task of the worker that wants that device goes through it, a cold model is
loaded once (single-flight) and small requests for the same model arriving
together are run as one forward pass (dynamic batching, as Triton's
``max_queue_delay_microseconds``). Text generation runs there too, on the same
cache, streaming each text back as it grows; generations with identical sampling
settings that arrive together run as one batch (a seeded sampled one runs alone, so
its seed repeats). Requests for different LoRA adapters of one base (and for the base
itself) share a batch: each row runs with its own adapter (peft's mixed-batch forward,
:mod:`hypha_celery.models.transformers_runtime`). Training runs in *job* executors, reused
between jobs but holding no cache, since training changes the weights.

Every executor is a fresh interpreter (``python -m hypha_celery.executor.child``),
never a fork of the worker, and speaks :mod:`hypha_celery.protocol` with
it. A job that overruns its deadline gets SIGTERM, then SIGKILL after a grace; its
executor is replaced on the next job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypha_celery import errors
from hypha_celery.config import KILL_GRACE_S
from hypha_celery.protocol import (
    FD_ENV,
    SETTINGS_ENV,
    ChildSettings,
    Describe,
    Description,
    Error,
    Fatal,
    Generate,
    Generated,
    GenerateResult,
    Infer,
    InferResult,
    JobLimits,
    Load,
    Loaded,
    Progress,
    ProtocolError,
    Ready,
    Reply,
    Request,
    Streamed,
    Train,
    TrainResult,
    Usage,
    decode_reply,
)
from hypha_celery.resources.ledger import Lease

__all__ = ["ChildTraceback", "ExecutorPool", "ExecutorSettings", "ItemResult"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 120.0
# The classes an executor may name in an Error: those rebuilt from one message string.
_ERRORS: dict[str, type[errors.HyphaError]] = {
    name: cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type)
    and issubclass(cls, errors.HyphaError)
    and not issubclass(cls, (errors.ConfigError, errors.ControlFlow))
}
_R = TypeVar("_R", bound=Reply)


class ChildTraceback(Exception):
    """The executor's traceback, chained as the ``__cause__`` of the error it reported.

    As ``concurrent.futures`` does for a worker process: the worker's log and the
    traceback Celery stores with a failed task then show where in the executor it failed.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


def error_from_reply(reply: Error, executor: str) -> errors.HyphaError:
    """The hypha error an executor's ``Error`` names; its traceback is logged and chained."""
    error = _ERRORS.get(reply.type, errors.ExecutionError)(reply.message)
    if reply.traceback:
        log.warning("executor %s: %s: %s\n%s", executor, reply.type, reply.message, reply.traceback)
        error.__cause__ = ChildTraceback(reply.traceback)
    return error


@dataclass(frozen=True)
class ExecutorSettings:
    """What every executor of this worker is started with."""

    store: str
    cache_size: int
    max_model_size: int
    sandbox: bool
    nice: int
    enforce_memory: bool
    enforce_cpu: bool
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.002
    memory_mode: str | None = None  # "rlimit" on CPU, "watchdog" with CUDA; override for tests
    max_text_bytes: int | None = None  # a text's byte bound for every model; None: from each model's length
    tmp_root: str = field(default_factory=tempfile.gettempdir)


class ExecutorProcess:
    """One executor interpreter and its socket. Used by one thread at a time."""

    def __init__(self, name: str, settings: ExecutorSettings, device_key: str, *, trains: bool = False) -> None:
        self.name = name
        self.device_key = device_key
        ours, theirs = socket.socketpair()
        memory_mode = settings.memory_mode or ("watchdog" if device_key.startswith("cuda") else "rlimit")
        child = ChildSettings(
            store=settings.store,
            cache_size=settings.cache_size,
            max_model_size=settings.max_model_size,
            device="cuda:0" if device_key.startswith("cuda") else "cpu",
            sandbox=settings.sandbox,
            nice=settings.nice,
            memory_mode=memory_mode if settings.enforce_memory else "off",
            tmpdir=tempfile.mkdtemp(prefix=f"hypha-{name}-", dir=settings.tmp_root),
            trains=trains,
            max_text_bytes=settings.max_text_bytes,
        )
        self.tmpdir = child.tmpdir
        env = _child_env()
        env.update({
            SETTINGS_ENV: json.dumps(child.to_json()),
            FD_ENV: str(theirs.fileno()),
            "TMPDIR": child.tmpdir,
            "HOME": child.tmpdir,
            # transformers models load offline, with a private (empty) Hugging Face home: nothing is fetched
            "HF_HOME": os.path.join(child.tmpdir, "hf-home"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "CUDA_VISIBLE_DEVICES": device_key.partition(":")[2] if device_key.startswith("cuda") else "",
        })
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hypha_celery.executor.child"],
            env=env,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        theirs.close()
        self._sock = ours
        self._reader = ours.makefile("rb")
        self._writer = ours.makefile("wb")
        try:
            hello = self._read(_START_TIMEOUT_S)
        except TimeoutError:
            self.kill()
            raise errors.ExecutorCrashed(f"executor {name} did not start within {_START_TIMEOUT_S:.0f}s") from None
        except errors.HyphaError:
            self.kill()
            raise
        if not isinstance(hello, Ready):
            self.kill()
            if isinstance(hello, Error):
                raise error_from_reply(hello, name)
            raise errors.ExecutorCrashed(f"executor {name} did not start: it sent {hello.kind!r}")
        self.pid = self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def _read(self, timeout: float | None) -> Reply:
        self._sock.settimeout(timeout)
        try:
            line = self._reader.readline()
        except TimeoutError:
            raise
        except (OSError, ValueError) as exc:
            raise errors.ExecutorCrashed(f"executor {self.name} connection failed: {exc}") from None
        if not line:
            code = self.process.wait()
            raise errors.ExecutorCrashed(f"executor {self.name} exited (code {code}) without an answer")
        try:
            return decode_reply(line)
        except ProtocolError as exc:
            raise errors.ExecutorCrashed(f"executor {self.name} broke the protocol: {exc}") from None

    def call(
        self,
        request: Request,
        expect: type[_R],
        timeout: float,
        on_progress: Callable[[Progress | Streamed], None] | None = None,
    ) -> _R:
        """Send one request; wait for its ``expect`` answer until ``timeout`` seconds, then kill and raise."""
        deadline = time.monotonic() + timeout
        try:
            self._writer.write(request.encode())
            self._writer.flush()
        except OSError as exc:
            raise errors.ExecutorCrashed(f"executor {self.name} is gone: {exc}") from None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._overran(timeout)
            try:
                reply = self._read(remaining)
            except TimeoutError:
                self._overran(timeout)
            except errors.ExecutorCrashed:
                self.kill()
                raise
            if isinstance(reply, (Progress, Streamed)):
                if on_progress is not None:
                    try:
                        on_progress(reply)
                    except Exception as exc:  # progress is advisory: keep reading this job's replies
                        log.warning("progress report failed: %s", exc)
                continue
            if isinstance(reply, Fatal):
                self.kill()
                raise error_from_reply(reply, self.name)
            if isinstance(reply, Error):
                raise error_from_reply(reply, self.name)
            if isinstance(reply, expect):
                return reply
            self.kill()
            raise errors.ExecutorCrashed(f"executor {self.name} answered {request.kind!r} with {reply.kind!r}")

    def _overran(self, timeout: float) -> None:
        self.kill()
        raise errors.TaskTimeout(
            f"the task ran past task_timeout ({timeout:.0f}s) and was stopped (SIGTERM, then SIGKILL after {KILL_GRACE_S:.0f}s)"
        )

    def kill(self) -> None:
        """SIGTERM, a grace period, then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.close()

    def close(self) -> None:
        for handle in (self._reader, self._writer, self._sock):
            try:
                handle.close()
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.terminate()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _child_env() -> dict[str, str]:
    """The executor's environment: nothing of the worker's secrets, only what Python and torch need.

    ``LD_LIBRARY_PATH`` and ``CUDA_HOME`` stay: GPU images (NVIDIA's container
    runtime among them) find the driver's ``libcuda`` through them.
    """
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHASHSEED", "OMP_NUM_THREADS",
            "LD_LIBRARY_PATH", "CUDA_HOME")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    env.setdefault("PATH", "/usr/bin:/bin")
    env["MALLOC_ARENA_MAX"] = "2"  # bounded allocator arenas keep RLIMIT_AS meaningful
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@dataclass
class ItemResult:
    """One task's share of an inference job."""

    output: Any
    cache_hit: bool
    load_s: float
    compute_s: float
    batch_size: int
    memory_peak: int
    device: str
    cpu_affinity: list[int]
    gpu_memory_peak: int | None = None


@dataclass
class GeneratedItem:
    """One task's share of a generation job."""

    output: Generated
    time_to_first_token_s: float
    compute_s: float
    cache_hit: bool
    load_s: float
    batch_size: int
    usage: Usage
    dtype: str | None = None  # the loaded model's parameter dtype


@dataclass
class _Request:
    model: str
    inputs: Any
    lease: Lease
    deadline: float
    batchable: bool
    expected_size: int | None
    generate: Generate | None = None  # a generation, streaming into ``streamed``
    family: str | None = None  # an adapter's base: requests for adapters of one base (and the base) share batches
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: ItemResult | None = None
    generated: GeneratedItem | None = None
    updates: queue.SimpleQueue[Streamed | None] = field(default_factory=queue.SimpleQueue)  # to the task's thread;
    # None: finished
    error: BaseException | None = None

    @property
    def batch_key(self) -> tuple[str, str]:
        """Requests that may share a batch: the same model (or adapters of one base, and that base), and for
        generations the same sampling settings."""
        family = self.family or self.model
        if self.generate is None:
            return ("infer", family)
        return ("generate", family + json.dumps(self.generate.params, sort_keys=True))

    def finish(self, result: ItemResult | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()
        self.updates.put(None)

    def stream(self, update: Progress | Streamed) -> None:
        if isinstance(update, Streamed):
            self.updates.put(update)


def _job_limits(leases: list[Lease], settings: ExecutorSettings) -> JobLimits:
    # Affinity: the cores held alone, and for a fraction every core of the shared pool it was admitted
    # to (the kernel spreads fractions over it); threads: the cores' worth reserved, at least one.
    cores = sorted({core for lease in leases for core in lease.cores})
    milli = sum(sum(lease.cores.values()) for lease in leases)
    return JobLimits(
        memory=sum(lease.memory for lease in leases) if settings.enforce_memory else None,
        cores=cores if settings.enforce_cpu and cores else None,
        gpu_memory=sum(sum(lease.gpus.values()) for lease in leases) or None,
        threads=min(len(cores), max(1, -(-milli // 1000))) if settings.enforce_cpu and cores else None,
    )


def _mixed(models: list[str]) -> list[str] | None:
    """Each item's model for a batch that mixes adapters of one base; None when every item asks for one model."""
    return models if len(set(models)) > 1 else None


def device_key(lease: Lease) -> str:
    return f"cuda:{lease.cuda_visible_devices}" if lease.gpus else "cpu"


class _Lane:
    """The serving executor for one device and the batcher that feeds it."""

    def __init__(self, pool: ExecutorPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.executor: ExecutorProcess | None = None
        self.pending: deque[_Request] = deque()
        self.cond = threading.Condition()
        self.cache: dict[str, int] = {}
        self.warm = False  # started at boot: kept running (restarted in the background if it dies)
        self.calling = threading.Lock()  # one request on the executor's socket at a time
        self.thread = threading.Thread(target=self._run, name=f"hypha-batcher-{key}", daemon=True)
        self.thread.start()

    def submit(self, request: _Request) -> None:
        with self.cond:
            self.pending.append(request)
            self.cond.notify()

    def _take_batch(self) -> list[_Request] | None:
        settings = self.pool.settings
        with self.cond:
            while not self.pending:
                if self.pool.closed:
                    return None
                self.cond.wait(0.5)
            first = self.pending[0]
            limit = settings.max_batch_size if first.batchable else 1
            form_until = first.enqueued + settings.max_queue_delay_s
            while limit > 1 and not self.pool.closed:
                same = sum(1 for r in self.pending if r.batch_key == first.batch_key and r.batchable)
                wait = form_until - time.monotonic()
                if same >= limit or wait <= 0:
                    break
                self.cond.wait(wait)
            batch = [first]
            self.pending.popleft()
            for request in list(self.pending):
                if len(batch) >= limit:
                    break
                if request.batch_key == first.batch_key and request.batchable:
                    batch.append(request)
                    self.pending.remove(request)
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
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

    def _execute(self, batch: list[_Request]) -> None:
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
            limits=_job_limits([r.lease for r in batch], self.pool.settings),
            models=_mixed([r.model for r in batch]),
        )
        try:
            reply = executor.call(job, InferResult, timeout)
        except (errors.MemoryLimitExceeded, errors.ExecutorCrashed) as exc:
            self._cache_changed({})
            if len(batch) > 1:
                for request in batch:  # find the one at fault: each runs alone
                    self._execute([request])
                return
            batch[0].finish(error=exc)
            return
        except errors.HyphaError as exc:
            if isinstance(exc, errors.TaskTimeout):
                self._cache_changed({})
            elif job.models is not None:  # one model of a mixed batch failed (an adapter that cannot attach)
                self._per_model(batch, self._execute)
                return
            for request in batch:
                request.finish(error=exc)
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

    def _generate(self, executor: ExecutorProcess, batch: list[_Request], job: Generate, timeout: float) -> None:
        prompts = [prompt for request in batch for prompt in request.generate.prompts]  # type: ignore[union-attr]
        models = [request.model for request in batch for _ in request.generate.prompts]  # type: ignore[union-attr]
        job = dataclasses.replace(job, model=batch[0].model, prompts=prompts, models=_mixed(models),
                                  limits=_job_limits([r.lease for r in batch], self.pool.settings))

        def route(update: Progress | Streamed) -> None:
            if isinstance(update, Streamed) and 0 <= update.index < len(batch):
                batch[update.index].stream(update)

        try:
            reply = executor.call(job, GenerateResult, timeout, route)
        except errors.HyphaError as exc:
            if isinstance(exc, (errors.MemoryLimitExceeded, errors.ExecutorCrashed, errors.TaskTimeout)):
                self._cache_changed({})  # the executor was killed: its cache is gone
                if len(batch) > 1 and not isinstance(exc, errors.TaskTimeout):
                    for request in batch:  # find the one at fault: each runs alone
                        self._generate(self._ensure_executor(), [request], job, timeout)
                    return
            elif job.models is not None:  # one model of a mixed batch failed (an adapter that cannot attach)
                self._per_model(batch, lambda group: self._generate(self._ensure_executor(), group, job, timeout))
                return
            for request in batch:
                request.finish(error=exc)
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

    @staticmethod
    def _per_model(batch: list[_Request], run: Callable[[list[_Request]], None]) -> None:
        """Run a failed mixed batch again, one model's requests at a time, so only the model at fault fails."""
        groups: dict[str, list[_Request]] = {}
        for request in batch:
            groups.setdefault(request.model, []).append(request)
        for group in groups.values():
            run(group)

    def _cache_changed(self, cache: dict[str, int]) -> None:
        """Report the cache's bytes (to the ledger); a failure is retried at the next change."""
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
        request = _Request(model, inputs, lease, time.monotonic() + timeout, batchable, expected_size, family=family)
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

        Blocks until done.

        ``on_progress`` gets every report, in order, in the calling thread (a Celery task's state
        belongs to its own thread) as soon as it comes (each carries the tokens since the one before).
        """
        if self.closed:
            raise errors.ExecutorCrashed("the worker is shutting down")
        seeded_sampling = job.params.get("do_sample") and job.params.get("seed") is not None
        request = _Request(job.model, None, lease, time.monotonic() + timeout, not seeded_sampling, job.expected_size,
                           generate=job, family=family)
        self._lane(device_key(lease)).submit(request)
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
        key = device_key(lease)
        with self._lock:
            idle = self._idle_jobs.setdefault(key, [])
            executor = idle.pop() if idle else None
        if executor is None or not executor.alive:
            executor = ExecutorProcess(f"job-{key.replace(':', '')}", self.settings, key, trains=True)
        job = dataclasses.replace(job, limits=_job_limits([lease], self.settings))
        try:
            result = executor.call(job, TrainResult, timeout, _training_progress(on_progress))
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
            return lane._ensure_executor().call(Describe(), Description, _START_TIMEOUT_S)

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
                    reply = executor.call(Load(model=model, expected_size=expected), Loaded, _START_TIMEOUT_S)
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
