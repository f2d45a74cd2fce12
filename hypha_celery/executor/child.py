"""The executor process: runs ML jobs for a worker, under the job's limits.

Started by :mod:`hypha_celery.executor.pool` as ``python -m
hypha_celery.executor.child`` (a fresh interpreter, never a fork of the
worker: no inherited CUDA context, no inherited locks). It speaks JSON lines
on the socket passed as file descriptor ``HYPHA_EXECUTOR_FD``; its settings
come as JSON in ``HYPHA_EXECUTOR``. JSON, not pickle, both ways: a process that
ran untrusted inputs must not be able to make the worker run code.

Requests:  ``{"op": "infer", "model": id, "items": [...], "limits": {...}}``
           ``{"op": "train", "model": id, "data": {...}, "epochs": n, "lr": x,
             "batch_size": n, "new_model": id, "limits": {...}}``
Replies:   ``{"progress": {...}}`` (train, any number), then
           ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type", "message"}}``.
A memory watchdog that fires writes ``{"fatal": {...}}`` and exits.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypha_celery.executor import limits

_ALLOCATION_FAILURES = ("can't allocate memory", "DefaultCPUAllocator", "out of memory", "CUDA out of memory")


class _Channel:
    def __init__(self, sock: socket.socket) -> None:
        self._reader = sock.makefile("rb")
        self._writer = sock.makefile("wb")
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any] | None:
        line = self._reader.readline()
        return json.loads(line) if line else None

    def write(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self._writer.write(data)
            self._writer.flush()


class Executor:
    def __init__(self, settings: dict[str, Any], channel: _Channel) -> None:
        import torch

        from hypha_celery.models.cache import ModelCache
        from hypha_celery.models.store import ModelStore

        self.torch = torch
        self.settings = settings
        self.channel = channel
        self.device = settings["device"]
        self.tmpdir = Path(settings["tmpdir"])
        self.store = ModelStore(settings["store"], max_model_size=settings["max_model_size"])
        self.cache = ModelCache(settings["cache_size"], self._load, on_evict=self._unload)
        self.memory_mode = settings["memory_mode"]
        self._pinned: list[int] | None = None
        torch.set_num_threads(1)

    def _load(self, model_id: str) -> tuple[Any, int]:
        from hypha_celery.models.runtime import load

        return load(self.store, model_id, self.device)

    def _unload(self, model_id: str, loaded: Any) -> None:
        del loaded
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()

    @contextmanager
    def _limits(self, job_limits: dict[str, Any]) -> Iterator[None]:
        cores = job_limits.get("cores")
        if cores and cores != self._pinned:  # re-pinning every thread costs a syscall each: only on change
            self.torch.set_num_threads(max(1, len(cores)))
            limits.pin_threads(cores)
            self._pinned = cores
        gpu_bytes = job_limits.get("gpu_memory")
        if gpu_bytes and self.device.startswith("cuda"):
            total = self.torch.cuda.get_device_properties(0).total_memory
            cached = sum(self.cache.sizes().values())
            self.torch.cuda.set_per_process_memory_fraction(min(1.0, (cached + gpu_bytes) / total), 0)
            self.torch.cuda.reset_peak_memory_stats(0)
        limits.reset_peak_rss()
        try:
            with limits.memory_cap(job_limits.get("memory"), self.memory_mode, self._watchdog_fired):
                yield
        finally:
            self._clean_tmp()

    def _watchdog_fired(self, rss: int, cap: int) -> None:
        self.channel.write({"fatal": {
            "type": "MemoryLimitExceeded",
            "message": f"the task's process reached {rss >> 20} MiB resident, over its cap of {cap >> 20} MiB "
                       "(reserved memory plus runtime); it was stopped",
        }})
        os._exit(70)

    def _clean_tmp(self) -> None:
        for entry in self.tmpdir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _stats(self, started_rss: int) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "memory_peak": max(0, limits.peak_rss() - started_rss),
            "cache": self.cache.sizes(),
            "device": self.device,
            "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "threads": self.torch.get_num_threads(),
        }
        if self.device.startswith("cuda"):
            stats["gpu_memory_peak"] = int(self.torch.cuda.max_memory_allocated(0))
        return stats

    def infer(self, request: dict[str, Any]) -> dict[str, Any]:
        from hypha_celery.models.runtime import infer_batch

        items = request["items"]
        started_rss = limits.current_rss()
        with self._limits(request.get("limits", {})):
            started = time.perf_counter()
            with self.cache.use(request["model"], request.get("expected_size")) as use:
                compute_started = time.perf_counter()
                try:
                    outputs: list[Any] = infer_batch(use.value, items)
                    errors: list[dict[str, str] | None] = [None] * len(items)
                except Exception as exc:
                    if len(items) == 1:
                        raise
                    outputs, errors = self._one_by_one(use.value, items, exc)
                compute_s = time.perf_counter() - compute_started
        return {
            "outputs": outputs,
            "errors": errors,
            "cache_hit": use.hit,
            "load_s": use.load_s,
            "compute_s": compute_s,
            "total_s": time.perf_counter() - started,
            "batch_size": len(items),
            **self._stats(started_rss),
        }

    def _one_by_one(self, loaded: Any, items: list[Any], first: Exception) -> tuple[list[Any], list[dict[str, str] | None]]:
        """A batch failed: run each item alone so only the item at fault fails."""
        from hypha_celery.models.runtime import infer_batch

        outputs: list[Any] = []
        errors: list[dict[str, str] | None] = []
        for item in items:
            try:
                outputs.append(infer_batch(loaded, [item])[0])
                errors.append(None)
            except Exception as exc:
                outputs.append(None)
                errors.append(_error(exc))
        return outputs, errors

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        from hypha_celery.models.runtime import load, train

        started_rss = limits.current_rss()
        with self._limits(request.get("limits", {})):
            started = time.perf_counter()
            loaded, _ = load(self.store, request["model"], self.device, trainable=True)
            load_s = time.perf_counter() - started
            result = train(
                loaded,
                _training_data(request),
                epochs=request["epochs"],
                lr=request["lr"],
                batch_size=request["batch_size"],
                progress=lambda update: self.channel.write({"progress": update}),
                progress_interval=request.get("progress_interval", 0.25),
            )
            manifest = loaded.manifest
            self.store.save(
                request["new_model"],
                loaded.module,
                architecture=manifest.architecture,
                config=manifest.config,
                input_shape=manifest.input_shape,
                task=manifest.task,
                batchable=manifest.batchable,
                parent=manifest.id,
            )
            del loaded
        result.update({"model_id": request["new_model"], "load_s": load_s, "cache_hit": False, **self._stats(started_rss)})
        return result

    def describe(self) -> dict[str, Any]:
        """What this process is allowed: for operators and tests of the sandbox."""
        import socket as sockets

        return {
            "pid": os.getpid(),
            "cache": self.cache.sizes(),
            "net_namespace": os.readlink("/proc/self/ns/net"),
            "interfaces": [name for _, name in sockets.if_nameindex()],
            "nice": os.nice(0),
            "tmpdir": os.environ.get("TMPDIR"),
            "cwd": os.getcwd(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "environment": sorted(os.environ),
            "memory_mode": self.memory_mode,
        }

    def serve(self) -> None:
        while (request := self.channel.read()) is not None:
            op = request.get("op")
            try:
                if op == "infer":
                    result = self.infer(request)
                elif op == "train":
                    result = self.train(request)
                elif op == "ping":
                    result = self.describe()
                else:
                    raise ValueError(f"unknown op {op!r}")
                self.channel.write({"ok": True, "result": result})
            except Exception as exc:  # every failure goes back to the worker as a named error
                self.channel.write({"ok": False, "error": _error(exc)})


def _training_data(request: dict[str, Any]) -> dict[str, Any]:
    """Inline rows, or a stored data set's ``data.json`` (verified by the worker just before)."""
    from hypha_celery.errors import InvalidInput

    if "data" in request:
        data: Any = request["data"]
    else:
        with open(request["data_path"]) as handle:
            data = json.load(handle)
    if not isinstance(data, dict) or not {"inputs", "targets"} <= set(data):
        raise InvalidInput("a data set must be an object with 'inputs' and 'targets'")
    return data


def _error(exc: BaseException) -> dict[str, str]:
    from hypha_celery.errors import HyphaError

    message = str(exc)
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(marker in message for marker in _ALLOCATION_FAILURES)
    ):
        return {
            "type": "MemoryLimitExceeded",
            "message": "the task tried to allocate more memory than it reserved: "
            + (message.splitlines() or ["MemoryError"])[0][:300],
        }
    if isinstance(exc, HyphaError):
        return {"type": type(exc).__name__, "message": message}
    return {
        "type": "ExecutionError",
        "message": f"{type(exc).__name__}: {message}"[:2000],
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
    }


def main() -> None:
    settings = json.loads(os.environ["HYPHA_EXECUTOR"])
    sock = socket.socket(fileno=int(os.environ["HYPHA_EXECUTOR_FD"]))
    channel = _Channel(sock)
    try:
        limits.apply_static(nice=settings["nice"], sandbox=settings["sandbox"])
        tmpdir = Path(settings["tmpdir"])
        tmpdir.mkdir(parents=True, exist_ok=True)
        os.chdir(tmpdir)
        executor = Executor(settings, channel)
    except Exception as exc:
        channel.write({"ok": False, "error": {"type": "ExecutorCrashed", "message": f"executor could not start: {exc}"}})
        sys.exit(71)
    channel.write({"ready": True, "pid": os.getpid()})
    executor.serve()


if __name__ == "__main__":
    main()
