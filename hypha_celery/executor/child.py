"""The executor process: runs ML jobs for a worker, under the job's limits.

Started by :mod:`hypha_celery.executor.pool` as ``python -m
hypha_celery.executor.child`` (a fresh interpreter, never a fork of the
worker: no inherited CUDA context, no inherited locks). It speaks the typed
JSON-lines messages of :mod:`hypha_celery.protocol` on the socket
passed as a file descriptor; its settings come in the environment. It imports
no Celery, Redis or signing code: only torch, the model store and the protocol.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from hypha_celery.errors import InvalidInput, contained
from hypha_celery.executor import limits
from hypha_celery.executor.continuous import Continuous
from hypha_celery.executor.failures import error_reply
from hypha_celery.manifest import expected_size
from hypha_celery.models.cache import ModelCache, Use
from hypha_celery.models.store import Entry, ModelStore
from hypha_celery.protocol import (
    FD_ENV,
    SETTINGS_ENV,
    Cancel,
    ChildSettings,
    Describe,
    Description,
    Error,
    Fatal,
    GenerateResult,
    InferResult,
    Load,
    Loaded,
    Ready,
    Reply,
    Request,
    Stepped,
    Submit,
    TrainResult,
    Usage,
    decode_request,
)
from hypha_celery.work import Generate, Infer, JobLimits, OuterStep, Streamed, Train


class _Channel:
    """The executor's end of the socket: requests in, replies out (the watchdog thread writes too)."""

    def __init__(self, sock: socket.socket) -> None:
        self._reader = sock.makefile("rb")
        self._writer = sock.makefile("wb")
        self._lock = threading.Lock()

    def read_line(self) -> bytes:
        """The next request's line; empty when the worker closed its end."""
        return self._reader.readline()

    def write(self, message: Reply) -> None:
        data = message.encode()
        with self._lock:
            self._writer.write(data)
            self._writer.flush()


class Executor:
    """This process's model store and cache, and the requests it answers one at a time."""

    def __init__(self, settings: ChildSettings, channel: _Channel, staging: str | None = None) -> None:
        import torch  # only now: the process limits (a network namespace needs one thread) are applied

        self.torch = torch
        self.channel = channel
        self.device = settings.device
        self.tmpdir = Path(settings.tmpdir)
        self.store = ModelStore(settings.store, max_model_size=settings.max_model_size, staging=staging)
        self.cache = ModelCache(settings.cache_size, self._load, on_evict=self._unload)
        self.memory_mode = settings.memory_mode
        self.max_text_bytes = settings.max_text_bytes
        self._base_pins: dict[str, ExitStack] = {}  # adapter id -> its base's pin in the cache
        self._pinned: tuple[list[int], int] | None = None
        self.continuous = Continuous(self, channel.write, max_rows=settings.max_rows,
                                     prefix_cache_bytes=settings.prefix_cache_bytes, step_delay_s=settings.step_delay_s)
        torch.set_num_threads(1)

    def _load(self, model_id: str) -> tuple[Any, int]:
        from hypha_celery.runtimes.registry import load

        entry = self.store.open(model_id)
        adapter_of = entry.manifest.adapter_of
        if adapter_of is not None:
            return self._attach(entry, adapter_of.id)
        loaded, size = load(entry, self.device)
        if hasattr(loaded, "max_text_bytes"):  # a transformers model: the worker's text bound, if it set one
            loaded.max_text_bytes = self.max_text_bytes
        return loaded, size

    def _attach(self, adapter: Entry, base_id: str) -> tuple[Any, int]:
        """A LoRA adapter: its base from the cache, pinned while the adapter is held (LRU evicts the adapter first)."""
        from hypha_celery.runtimes.transformers_adapters import attach_adapter

        pin = ExitStack()
        base = pin.enter_context(self.cache.use(base_id, expected_size(self.store.manifest(base_id), self.device)))
        try:
            attached, size = attach_adapter(base.value, adapter)
        except BaseException:
            pin.close()
            raise
        self._base_pins[adapter.id] = pin
        return attached, size

    def _unload(self, model_id: str, loaded: Any) -> None:
        pin = self._base_pins.pop(model_id, None)
        if pin is not None:  # an adapter: detach it from the shared base, then let the base go
            from hypha_celery.runtimes.transformers_adapters import detach_adapter

            detach_adapter(loaded)
            pin.close()
        del loaded
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()

    def _pin(self, job_limits: JobLimits) -> None:
        """Pin the compute threads to the job's cores (the serving loop calls it before each step)."""
        cores = job_limits.cores
        pinned = (cores, max(1, job_limits.threads or len(cores))) if cores else None
        if pinned and pinned != self._pinned:  # re-pinning every thread costs a syscall each: only on change
            self.torch.set_num_threads(pinned[1])
            limits.pin_threads(pinned[0])
            self._pinned = pinned

    @contextmanager
    def _limits(self, job_limits: JobLimits) -> Iterator[None]:
        self._pin(job_limits)
        gpu_bytes = job_limits.gpu_memory
        if gpu_bytes and self.device.startswith("cuda"):
            total = self.torch.cuda.get_device_properties(0).total_memory
            cached = sum(self.cache.sizes().values())
            self.torch.cuda.set_per_process_memory_fraction(min(1.0, (cached + gpu_bytes) / total), 0)
            self.torch.cuda.reset_peak_memory_stats(0)
        limits.reset_peak_rss()
        try:
            with limits.memory_cap(job_limits.memory, self.memory_mode, self._watchdog_fired):
                yield
        finally:
            self._clean_tmp()

    def _watchdog_fired(self, rss: int, cap: int) -> None:
        self.channel.write(Fatal(
            type="MemoryLimitExceeded",
            message=f"the task's process reached {rss >> 20} MiB resident, over its cap of {cap >> 20} MiB "
                    "(reserved memory plus runtime); it was stopped",
        ))
        os._exit(70)

    def _clean_tmp(self) -> None:
        for entry in self.tmpdir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _usage(self, started_rss: int) -> Usage:
        return Usage(
            memory_peak=max(0, limits.peak_rss() - started_rss),
            device=self.device,
            cpu_affinity=sorted(os.sched_getaffinity(0)),
            gpu_memory_peak=int(self.torch.cuda.max_memory_allocated(0)) if self.device.startswith("cuda") else None,
        )

    def infer(self, request: Infer) -> InferResult:
        from hypha_celery.runtimes.registry import infer_batch

        items = request.items
        started_rss = limits.current_rss()
        with self._limits(request.limits):
            with self._models(request.model, request.expected_size, request.models) as (use, per_item):
                compute_started = time.perf_counter()
                try:
                    outputs: list[Any] = infer_batch(use.value, items, per_item)
                    errors: list[Error | None] = [None] * len(items)
                except BaseException as exc:
                    if len(items) == 1 or not contained(exc):
                        raise
                    outputs, errors = self._one_by_one(use.value, items, per_item)
                compute_s = time.perf_counter() - compute_started
        return InferResult(
            outputs=outputs,
            errors=errors,
            cache_hit=use.hit,
            load_s=use.load_s,
            compute_s=compute_s,
            batch_size=len(items),
            cache=self.cache.sizes(),
            usage=self._usage(started_rss),
        )

    @contextmanager
    def _models(self, model: str, expected_size: int | None, models: list[str] | None) -> Iterator[tuple[Use, Any]]:
        """``model`` from the cache, pinned; with ``models`` (a batch mixing adapters of one base) every one of them,
        pinned, and each item's loaded view (else None). The use reports a hit only if every model was cached."""
        if not models or len(set(models)) == 1:
            with self.cache.use(model, expected_size) as use:
                yield use, None
            return
        with ExitStack() as stack:
            uses = {name: stack.enter_context(self.cache.use(name, expected_size if name == model else None))
                    for name in dict.fromkeys([model, *models])}
            first = uses[model]
            combined = Use(first.value, first.size, hit=all(u.hit for u in uses.values()),
                           load_s=sum(u.load_s for u in uses.values()))
            yield combined, [uses[name].value for name in models]

    def _one_by_one(self, loaded: Any, items: list[Any], per_item: Any = None) -> tuple[list[Any], list[Error | None]]:
        """A batch failed: run each item alone so only the item at fault fails."""
        from hypha_celery.runtimes.registry import infer_batch

        outputs: list[Any] = []
        errors: list[Error | None] = []
        for index, item in enumerate(items):
            try:
                outputs.append(infer_batch(per_item[index] if per_item else loaded, [item])[0])
                errors.append(None)
            except BaseException as exc:
                if not contained(exc):
                    raise
                outputs.append(None)
                errors.append(error_reply(exc))
        return outputs, errors

    def generate(self, request: Generate, report: Callable[[Streamed], None] | None = None) -> GenerateResult:
        """One generation job (a batch of prompts) run statically on the cached model, streaming each text to
        the worker (``report``: where the reports go; default the socket)."""
        from hypha_celery.runtimes.registry import generate

        started_rss = limits.current_rss()
        if self.continuous.step_delay_s:  # the slow-machine test hook reaches the static path too
            request = dataclasses.replace(request, step_delay_s=self.continuous.step_delay_s)
        with self._limits(request.limits):
            with self._models(request.model, request.expected_size, request.models) as (use, per_prompt):
                done = generate(use.value, request, report or self.channel.write, per_prompt)
                dtype = str(use.value.module.dtype).removeprefix("torch.")
        return GenerateResult(
            outputs=[None if isinstance(o, Exception) else o for o in done.outputs],
            errors=[error_reply(o) if isinstance(o, Exception) else None for o in done.outputs],
            time_to_first_token_s=done.time_to_first_token_s,
            compute_s=done.compute_s,
            cache_hit=use.hit,
            load_s=use.load_s,
            cache=self.cache.sizes(),
            usage=self._usage(started_rss),
            dtype=dtype,
        )

    def train(self, request: Train) -> TrainResult:
        from hypha_celery.runtimes.builtin import train
        from hypha_celery.runtimes.registry import load

        started_rss = limits.current_rss()
        entry = self.store.open(request.model)
        if entry.manifest.runtime == "transformers":
            return self._train_transformer(request, entry, started_rss)
        with self._limits(request.limits):
            started = time.perf_counter()
            loaded, _ = load(entry, self.device, trainable=True)
            load_s = time.perf_counter() - started
            trained = train(
                loaded,
                _training_data(request),
                epochs=request.epochs,
                lr=request.lr,
                batch_size=request.batch_size,
                progress=self.channel.write,
                progress_interval=request.progress_interval,
            )
            manifest = loaded.manifest
            self.store.add(
                "builtin", loaded.module, request.new_model,
                architecture=manifest.architecture,
                config=manifest.config,
                input_shape=manifest.input_shape,
                task=manifest.task,
                batchable=manifest.batchable,
                parent=manifest.id,
                produced_by=None if request.task_id is None else {"task_id": request.task_id,
                                                                  "trained": trained.to_json()},
            )
            del loaded
        return TrainResult(model_id=request.new_model, trained=trained, load_s=load_s, usage=self._usage(started_rss))

    def _train_transformer(self, request: Train, entry: Entry, started_rss: int) -> TrainResult:
        """Full or LoRA fine-tuning (:mod:`hypha_celery.training.finetune`); the result enters the store as a new entry."""
        from hypha_celery.training.finetune.run import finetune
        from hypha_celery.training.finetune.save import save

        with self._limits(request.limits):
            done = finetune(self.store, request, _training_data(request, texts=True), self.device, self.channel.write,
                            max_text_bytes=self.max_text_bytes, entry=entry)
            produced = None if request.task_id is None else {"task_id": request.task_id, "trained": done.trained.to_json()}
            out = self.tmpdir / "trained"
            out.mkdir()
            if save(done, out, merge=request.merge) == "adapter":
                self.store.add("transformers", out, request.new_model, base=entry, produced_by=produced)
            else:
                self.store.add("transformers", out, request.new_model, task=done.model.manifest.task,
                               parent=request.model, produced_by=produced)
            self._discard_checkpoints(request)
            trained, load_s = done.trained, done.load_s
            del done
        return TrainResult(model_id=request.new_model, trained=trained, load_s=load_s,
                           usage=self._usage(started_rss))

    def outer_step(self, request: OuterStep) -> Stepped:
        """A DiLoCo outer step (:mod:`hypha_celery.training.distributed.apply`) under the lease's limits: a step
        larger than its memory reservation fails here (``MemoryLimitExceeded``), not in the worker."""
        from hypha_celery.training.distributed.apply import run

        started_rss = limits.current_rss()
        with self._limits(request.limits):
            done = run(self.store, request, self.tmpdir)
        return Stepped(**done, usage=self._usage(started_rss))

    def _discard_checkpoints(self, request: Train) -> None:
        """The model is saved: the task's checkpoints (:mod:`hypha_celery.training.checkpoints.local`) have done their work."""
        from hypha_celery.training.checkpoints.local import discard

        if request.task_id is not None:
            discard(self.store.root, request.task_id)

    def describe(self) -> Description:
        """What this process is allowed: for operators and tests of the sandbox."""
        return Description(
            pid=os.getpid(),
            cache=self.cache.sizes(),
            net_namespace=os.readlink("/proc/self/ns/net"),
            interfaces=[name for _, name in socket.if_nameindex()],
            nice=os.nice(0),
            tmpdir=os.environ.get("TMPDIR"),
            cwd=os.getcwd(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            environment=sorted(os.environ),
            memory_mode=self.memory_mode,
        )

    def handle(self, request: Request) -> Reply:
        if isinstance(request, Infer):
            return self.infer(request)
        if isinstance(request, Generate):
            return self.generate(request)
        if isinstance(request, Train):
            return self.train(request)
        if isinstance(request, OuterStep):
            return self.outer_step(request)
        if isinstance(request, Load):
            with self.cache.use(request.model, request.expected_size) as use:
                pass
            return Loaded(cache_hit=use.hit, load_s=use.load_s, cache=self.cache.sizes())
        assert isinstance(request, Describe), request
        return self.describe()

    def serve(self) -> None:
        """Answer requests until the worker closes its end; between them, step the running batches.

        A reader thread queues the worker's lines, so a generation submitted while others decode
        joins them at the next step; other requests are answered in order, between two steps.
        """
        inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()

        def read() -> None:
            while line := self.channel.read_line():
                inbox.put(line)
            inbox.put(b"")

        threading.Thread(target=read, name="hypha-executor-reader", daemon=True).start()
        while True:
            if self.continuous.busy:
                try:
                    line = inbox.get_nowait()
                except queue.Empty:
                    self.continuous.step()
                    continue
            else:
                line = inbox.get()
            if not line:
                return
            self._answer(line)

    def _answer(self, line: bytes) -> None:
        try:
            request = decode_request(line)
            if isinstance(request, Submit):
                self.continuous.submit(request)
                return
            if isinstance(request, Cancel):
                self.continuous.cancel(request)
                return
            reply = self.handle(request)
        except BaseException as exc:  # every failure goes back to the worker as a named error; the cache stays
            if not contained(exc):
                raise
            reply = error_reply(exc)
        self.channel.write(reply)


def _training_data(request: Train, *, texts: bool = False) -> dict[str, Any]:
    """Inline rows, or a stored data set's ``data.json`` (verified by the worker just before).

    ``texts``: for a transformers model, ``{"texts": [...]}`` (causal LM) or ``{"texts", "labels"}`` (classifier).
    """
    data: Any = request.data
    if data is None:
        if request.data_path is None:
            raise InvalidInput("a training job needs data or a data set")
        with open(request.data_path) as handle:
            data = json.load(handle)
    wanted = ({"texts"}, "'texts' (and 'labels' for a classifier)") if texts else ({"inputs", "targets"},
                                                                                    "'inputs' and 'targets'")
    if not isinstance(data, dict) or not wanted[0] <= set(data):
        raise InvalidInput(f"a data set for model {request.model!r} must be an object with {wanted[1]}")
    return data


def main() -> None:
    settings = ChildSettings.from_json(json.loads(os.environ[SETTINGS_ENV]))
    channel = _Channel(socket.socket(fileno=int(os.environ[FD_ENV])))
    try:
        tmpdir = Path(settings.tmpdir)
        tmpdir.mkdir(parents=True, exist_ok=True)
        limits.apply_static(nice=settings.nice, sandbox=settings.sandbox)
        staging = None
        if settings.sandbox:  # last: the network namespace writes /proc/self/uid_map first
            staging = limits.confine_filesystem(store=settings.store, tmpdir=settings.tmpdir, trains=settings.trains)
        os.chdir(tmpdir)
        executor = Executor(settings, channel, staging)
    except Exception as exc:
        channel.write(Error(type="ExecutorCrashed", message=f"executor could not start: {exc}"))
        sys.exit(71)
    channel.write(Ready(pid=os.getpid()))
    executor.serve()


if __name__ == "__main__":
    main()
