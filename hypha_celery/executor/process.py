"""One executor interpreter seen from the worker: spawn it, talk to it, stop it.

The pool (:mod:`hypha_celery.executor.pool`) decides which work goes to which executor and the
batching policy (:mod:`hypha_celery.executor.batching`) what runs together; this module is what
both leave out: the child's environment (none of the worker's secrets), its start handshake,
reading its replies under a deadline, turning its ``Error`` replies back into hypha errors
(with the child's traceback chained) and the SIGTERM-then-SIGKILL of an executor that overran.

Every executor is a fresh interpreter (``python -m hypha_celery.executor.child``), never a
fork of the worker, and speaks :mod:`hypha_celery.protocol` with it. One reader thread per
executor reads every reply: a :class:`~hypha_celery.protocol.Tagged` one goes to the handler of
its submitted generation (many may be in flight, :meth:`ExecutorProcess.submit`), the others to
the one :meth:`ExecutorProcess.call` waiting. When the executor dies, every handler is told.
"""

from __future__ import annotations

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from hypha_celery import errors
from hypha_celery.config import KILL_GRACE_S
from hypha_celery.executor.tags import Tags
from hypha_celery.protocol import (
    FD_ENV,
    SETTINGS_ENV,
    Cancel,
    ChildSettings,
    Error,
    Fatal,
    Progress,
    ProtocolError,
    Ready,
    Reply,
    Request,
    Streamed,
    Submit,
    Tagged,
    TaggedReply,
    decode_reply,
)
from hypha_celery.units import env_seconds
from hypha_celery.work import Generate

__all__ = ["START_TIMEOUT_S", "ChildTraceback", "ExecutorProcess", "ExecutorSettings", "TagHandler", "error_from_reply"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a new executor imports torch before it says Ready
_R = TypeVar("_R", bound=Reply)
# Gets a submitted generation's tagged replies, in order, in the reader thread; an error (not a reply) when the
# executor was lost with it in flight (then :attr:`ExecutorProcess.lost_with` says how many were).
TagHandler = Callable[[TaggedReply | errors.HyphaError], None]


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
    error = errors.rebuilt(reply.type, reply.message) or errors.ExecutionError(reply.message)
    if reply.traceback:
        log.warning("executor %s: %s: %s\n%s", executor, reply.type, reply.message, reply.traceback)
        error.__cause__ = ChildTraceback(reply.traceback)
    return error


@dataclass(frozen=True)
class ExecutorSettings:
    """What every executor of this worker is started with, and the pool's batching limits."""

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
    generation_batching: str = "continuous"  # [worker.generation] batching: "continuous" or "static"
    prefix_cache_bytes: int = 64 * 2**20  # [worker.generation] prefix_cache: each serving engine's prefix KV
    tmp_root: str = field(default_factory=tempfile.gettempdir)


class ExecutorProcess:
    """One executor interpreter and its socket.

    :meth:`call` is used by one thread at a time; :meth:`submit` and :meth:`cancel` from any thread.
    """

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
            max_rows=settings.max_batch_size,
            prefix_cache_bytes=settings.prefix_cache_bytes,
            step_delay_s=env_seconds(DECODE_DELAY_ENV, 10),
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
            hello = self._read(START_TIMEOUT_S)
        except TimeoutError:
            self.kill()
            raise errors.ExecutorCrashed(f"executor {name} did not start within {START_TIMEOUT_S:.0f}s") from None
        except errors.HyphaError:
            self.kill()
            raise
        if not isinstance(hello, Ready):
            self.kill()
            if isinstance(hello, Error):
                raise error_from_reply(hello, name)
            raise errors.ExecutorCrashed(f"executor {name} did not start: it sent {hello.kind!r}")
        self.pid = self.process.pid
        self._replies: queue.SimpleQueue[Reply | errors.HyphaError] = queue.SimpleQueue()
        self._tags: Tags[TaggedReply, errors.HyphaError] = Tags(lambda reply: not isinstance(reply, Streamed))
        self._write_lock = threading.Lock()
        self._sock.settimeout(None)
        threading.Thread(target=self._read_all, name=f"hypha-replies-{name}", daemon=True).start()

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
        self._send(request)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._overran(timeout)
            try:
                reply = self._replies.get(timeout=remaining)
            except queue.Empty:
                self._overran(timeout)
            if isinstance(reply, errors.HyphaError):
                self.kill()
                raise reply
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

    def submit(self, id: int, job: Generate, handler: TagHandler) -> None:
        """Send a one-prompt generation to the serving loop; ``handler`` gets its tagged replies (no waiting here)."""
        self._tags.add(id, handler)
        try:
            self._send(Submit(id=id, job=job))
        except errors.ExecutorCrashed:
            self._tags.discard(id)
            raise

    def cancel(self, id: int) -> None:
        """End the submitted generation ``id`` at the executor's next step; its handler still gets its last reply."""
        try:
            self._send(Cancel(id=id))
        except errors.ExecutorCrashed:
            pass  # gone: its handler hears of it from the reader

    @property
    def in_flight(self) -> int:
        return len(self._tags)

    @property
    def lost_with(self) -> int:
        """How many submitted generations were in flight when the executor was lost."""
        return self._tags.lost_with

    def _send(self, request: Request | Submit | Cancel) -> None:
        try:
            with self._write_lock:
                self._writer.write(request.encode())
                self._writer.flush()
        except (OSError, ValueError) as exc:
            raise errors.ExecutorCrashed(f"executor {self.name} is gone: {exc}") from None

    def _read_all(self) -> None:
        """The reader thread: every reply to where it belongs, until the executor is gone."""
        while True:
            try:
                line = self._reader.readline()
            except (OSError, ValueError) as exc:
                self._lose(errors.ExecutorCrashed(f"executor {self.name} connection failed: {exc}"))
                return
            if not line:
                try:
                    code: int | None = self.process.wait(KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    code = None
                self._lose(errors.ExecutorCrashed(f"executor {self.name} exited (code {code}) without an answer"))
                return
            try:
                reply = decode_reply(line)
            except ProtocolError as exc:
                self._lose(errors.ExecutorCrashed(f"executor {self.name} broke the protocol: {exc}"))
                return
            if isinstance(reply, Tagged):
                self._tags.route(reply.id, reply.reply)  # none waits: a generation the worker gave up on
                continue
            if isinstance(reply, Fatal):  # the memory watchdog: the executor exits, its rows with it
                self._lose(error_from_reply(reply, self.name), reply)
                return
            self._replies.put(reply)

    def _lose(self, error: errors.HyphaError, fatal: Fatal | None = None) -> None:
        self._replies.put(fatal if fatal is not None else error)  # the call waiting, if any
        self._tags.lose(error)

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
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread (EOF) before its file is closed
        except OSError:
            pass
        for handle in (self._reader, self._writer, self._sock):
            try:
                handle.close()
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.terminate()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


# A test hook: seconds the serving executors of a worker started with this variable sleep after each continuous
# batching step (a slow machine on demand: a generation that lasts long enough to kill its worker half way).
DECODE_DELAY_ENV = "HYPHA_TEST_DECODE_DELAY_S"


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
