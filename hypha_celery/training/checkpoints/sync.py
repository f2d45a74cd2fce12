"""Training checkpoints in shared storage, so a task resumes on any worker that shares the storage.

The executor writes checkpoints into its own store only (:mod:`.local`; it has no network
and no credentials). With ``[worker.training] shared_storage`` configured, the worker process
copies them out and back (:mod:`hypha_celery.models.shared_storage`; a folder every worker mounts, or S3)::

    checkpoints/<task>/step-<N>/state.safetensors   the newest checkpoint's files, as the executor wrote them
    checkpoints/<task>/step-<N>/checkpoint.json
    checkpoints/<task>/latest.json                  {"format", "task_id", "step", "files": {name: {"sha256", "size"}}}

``<task>`` is the local folder's name (:func:`.local.folder`). ``latest.json`` is written
after the files it names and the previous step's files are deleted after it, so a reader that
follows it finds whole files; :func:`fetch` downloads them with their recorded sha256 and size
(a file that is not what was uploaded is refused) into the local store, where the executor's
own checks (model sha256, data, settings, shapes) decide whether the run resumes from it.
:class:`Uploader` runs the uploads in a thread: training never waits for the network, an
upload that fails is logged, and notices that arrive during an upload collapse into one
upload of the newest checkpoint after it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, cast

from hypha_celery.errors import SharedStorageError
from hypha_celery.models.shared_storage import SharedStorage, Stored
from hypha_celery.training.checkpoints import local as checkpoint

__all__ = ["CHECKPOINTS", "LATEST", "Uploader", "discard", "fetch", "prefix", "upload"]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
FORMAT = 1
FILES = (checkpoint.STATE, checkpoint.META)
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def prefix(task_id: str) -> str:
    """The storage key under which task ``task_id``'s checkpoint lives."""
    return f"{CHECKPOINTS}/{checkpoint.folder('.', task_id).name}"


def _step_key(task_id: str, step: int) -> str:
    return f"{prefix(task_id)}/step-{step:09d}"


def upload(storage: SharedStorage, root: str | os.PathLike[str], task_id: str,
           stop: threading.Event | None = None) -> int | None:
    """Copy the task's newest local checkpoint to ``storage``; its step, or None when there was none to copy.

    Nothing is uploaded when the storage already holds that step. ``stop`` set aborts an upload
    between chunks (:class:`Stopped`). A checkpoint deleted locally mid-way (a newer one
    replaced it, or the run ended) raises ``OSError``; what was uploaded of it is left for
    the next upload or :func:`discard`.
    """
    found = checkpoint.latest(root, task_id)
    if found is None:
        return None
    step, path = found
    try:
        previous = _record(storage, task_id)
    except SharedStorageError as exc:
        log.warning("task %s: the shared checkpoint record is unreadable (%s); replacing it", task_id, exc)
        previous = None
    if previous is not None and previous["step"] == step:
        return step
    files: dict[str, dict[str, Any]] = {}
    for name in FILES:
        with open(path / name, "rb") as handle:
            stored = _put(storage, f"{_step_key(task_id, step)}/{name}", handle, stop)
        files[name] = {"sha256": stored.sha256, "size": stored.size}
    record = {"format": FORMAT, "task_id": task_id, "step": step, "files": files}
    storage.put_bytes(f"{prefix(task_id)}/{LATEST}", json.dumps(record, separators=(",", ":")).encode())
    if previous is not None:
        storage.delete(_step_key(task_id, previous["step"]))
    log.info("task %s: checkpoint at step %d copied to shared storage", task_id, step)
    return step


def fetch(storage: SharedStorage, root: str | os.PathLike[str], task_id: str) -> int | None:
    """Download the task's shared checkpoint into the local store when it is newer than the local one; its step.

    None when the storage holds none newer. A record or file that is not what was uploaded
    (sha256, size) raises ``SharedStorageError``, and nothing is left locally.
    """
    record = _record(storage, task_id)
    if record is None:
        return None
    step = record["step"]
    local = checkpoint.latest(root, task_id)
    if local is not None and local[0] >= step:
        return None
    target = checkpoint.folder(root, task_id)
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target))  # the executor clears a dead one's .tmp-
    except OSError as exc:
        raise SharedStorageError(f"cannot write a checkpoint under {target}: {exc.strerror}") from None
    try:
        for name in FILES:
            expected = record["files"][name]
            storage.get_file(f"{_step_key(task_id, step)}/{name}", staging / name, sha256=expected["sha256"],
                             max_size=expected["size"])
        published = target / f"step-{step:09d}"
        if published.exists():
            shutil.rmtree(published)
        os.rename(staging, published)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("task %s: checkpoint at step %d fetched from shared storage", task_id, step)
    return step


def discard(storage: SharedStorage, task_id: str) -> bool:
    """Delete the task's shared checkpoint (its record first, so no reader follows it); whether it had one."""
    had = storage.exists(f"{prefix(task_id)}/{LATEST}")
    storage.delete(f"{prefix(task_id)}/{LATEST}")
    storage.delete(prefix(task_id))
    return had


class Uploader:
    """One task's background uploads: :meth:`written` after each checkpoint, :meth:`close` when the run ends."""

    def __init__(self, storage: SharedStorage, root: str | os.PathLike[str], task_id: str) -> None:
        self.storage, self.root, self.task_id = storage, root, task_id
        self.uploaded: int | None = None  # the step the storage holds from this run
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"checkpoint-upload-{task_id[:8]}", daemon=True)
        self._thread.start()

    def written(self) -> None:
        """A checkpoint was written: upload the newest one once the upload in flight (if any) is done."""
        self._wanted.set()

    def close(self, timeout: float = 30.0) -> None:
        """Stop: an upload in flight is aborted at its next chunk; waits for the thread up to ``timeout`` seconds."""
        self._stop.set()
        self._wanted.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("task %s: a checkpoint upload did not stop within %.0f s", self.task_id, timeout)

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            try:
                step = upload(self.storage, self.root, self.task_id, self._stop)
            except Stopped:
                return
            except FileNotFoundError:  # replaced by a newer one (told next) or deleted as the run ended
                log.debug("task %s: a checkpoint went before it was uploaded", self.task_id)
                continue
            except (SharedStorageError, OSError) as exc:  # never fails the training: the next checkpoint tries again
                log.warning("task %s: checkpoint upload to shared storage failed: %s", self.task_id, exc)
                continue
            except Exception:
                log.exception("task %s: checkpoint upload to shared storage failed", self.task_id)
                continue
            if step is not None:
                self.uploaded = step


class Stopped(Exception):
    """An upload aborted by :meth:`Uploader.close`."""


def _put(storage: SharedStorage, key: str, handle: Any, stop: threading.Event | None) -> Stored:
    """Upload an open file, checking ``stop`` between chunks."""
    return storage.put_stream(key, handle if stop is None else _Stoppable(handle, stop))


class _Stoppable:
    """A reader that raises :class:`Stopped` once ``stop`` is set."""

    def __init__(self, inner: Any, stop: threading.Event) -> None:
        self.inner, self.stop = inner, stop

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise Stopped
        data: bytes = self.inner.read(size)
        return data


def _record(storage: SharedStorage, task_id: str) -> dict[str, Any] | None:
    """The task's ``latest.json``, checked; None when there is none."""
    key = f"{prefix(task_id)}/{LATEST}"
    raw = storage.get_bytes(key)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    files = record.get("files") if isinstance(record, dict) else None
    step = record.get("step") if isinstance(record, dict) else None
    good = (isinstance(record, dict) and record.get("format") == FORMAT and record.get("task_id") == task_id
            and isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 10 ** 12
            and isinstance(files, dict) and sorted(files) == sorted(FILES)
            and all(isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and _SHA256.match(entry["sha256"]) and isinstance(entry.get("size"), int)
                    and not isinstance(entry.get("size"), bool) and entry["size"] >= 0 for entry in files.values()))
    if not good:
        raise SharedStorageError(f"{storage.describe(key)} is not a checkpoint record of task {task_id!r}")
    return cast(dict[str, Any], record)
