"""Checkpoints in shared storage (a folder, and S3 on moto in process): upload, fetch with sha256 checks, delete."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from hypha_celery.errors import SharedStorageError
from hypha_celery.models.examples import TINY_LLAMA, init_examples
from hypha_celery.models.shared_storage import LocalStorage, S3Storage, SharedStorage
from hypha_celery.models.store import ModelStore
from hypha_celery.training.checkpoints import local as checkpoint
from hypha_celery.training.checkpoints import sync as checkpoint_sync
from hypha_celery.work import Progress, Train

TASK = "5e0c1a7b-3d2f-4b8e-9a61-0c4d2e8f7a13"
TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a bird sang in the tree", "the sun rose over the hill"]



def _write(root: Path, step: int, payload: bytes = b"") -> Path:
    """A checkpoint folder as TaskCheckpoints.save publishes it (the contents do not matter to the copying)."""
    folder = checkpoint.folder(root, TASK) / f"step-{step:09d}"
    folder.mkdir(parents=True)
    (folder / checkpoint.STATE).write_bytes(b"tensors of step %d " % step + payload)
    (folder / checkpoint.META).write_text(json.dumps({"step": step}))
    return folder


def _keys(storage: SharedStorage) -> set[str]:
    if isinstance(storage, LocalStorage):
        return {str(p.relative_to(storage.root)) for p in storage.root.rglob("*") if p.is_file()}
    assert isinstance(storage, S3Storage)
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=storage.prefix).get("Contents", [])
    return {entry["Key"].removeprefix(storage.prefix) for entry in listed}


def test_an_uploaded_checkpoint_is_fetched_whole_into_another_store(storage: SharedStorage, tmp_path: Path) -> None:
    # Given worker A's store with a checkpoint at step 25 (larger than one streaming chunk)
    a, b = tmp_path / "a", tmp_path / "b"
    written = _write(a, 25, bytes(range(256)) * 9000)
    # When A uploads it and B, with an empty store, fetches it
    assert checkpoint_sync.upload(storage, a, TASK) == 25
    assert checkpoint_sync.fetch(storage, b, TASK) == 25
    # Then B holds the same files where the executor looks for them, and nothing half-written
    found = checkpoint.latest(b, TASK)
    assert found is not None and found[0] == 25
    for name in (checkpoint.STATE, checkpoint.META):
        assert (found[1] / name).read_bytes() == (written / name).read_bytes()
    assert [p.name for p in checkpoint.folder(b, TASK).iterdir()] == ["step-000000025"]
    # And the record names the files' sha256 and sizes
    record = json.loads(storage.get_bytes(f"checkpoints/{TASK}/latest.json") or b"{}")
    assert record["step"] == 25 and record["files"][checkpoint.STATE]["size"] == (written / checkpoint.STATE).stat().st_size


def test_a_newer_checkpoint_replaces_the_older_upload(storage: SharedStorage, tmp_path: Path) -> None:
    # Given step 25 uploaded, then the executor writes step 50 and removes 25
    _write(tmp_path / "a", 25)
    checkpoint_sync.upload(storage, tmp_path / "a", TASK)
    newer = _write(tmp_path / "a", 50)
    shutil.rmtree(checkpoint.folder(tmp_path / "a", TASK) / "step-000000025")
    # When it is uploaded (twice: the second finds it there already)
    assert checkpoint_sync.upload(storage, tmp_path / "a", TASK) == 50
    assert checkpoint_sync.upload(storage, tmp_path / "a", TASK) == 50
    # Then only step 50's files and the record are left
    assert _keys(storage) == {f"checkpoints/{TASK}/latest.json", f"checkpoints/{TASK}/step-000000050/state.safetensors",
                              f"checkpoints/{TASK}/step-000000050/checkpoint.json"}
    assert checkpoint_sync.fetch(storage, tmp_path / "b", TASK) == 50
    assert (checkpoint.folder(tmp_path / "b", TASK) / newer.name / checkpoint.STATE).read_bytes() == \
        (newer / checkpoint.STATE).read_bytes()


def test_a_local_checkpoint_as_new_is_kept_and_none_is_no_error(storage: SharedStorage, tmp_path: Path) -> None:
    # Given nothing shared, Then there is nothing to fetch or upload
    assert checkpoint_sync.fetch(storage, tmp_path / "b", TASK) is None
    assert checkpoint_sync.upload(storage, tmp_path / "a", TASK) is None
    # Given step 25 shared and a local step 25 (a worker on the same model_dir), Then the local one is used
    _write(tmp_path / "a", 25)
    checkpoint_sync.upload(storage, tmp_path / "a", TASK)
    assert checkpoint_sync.fetch(storage, tmp_path / "a", TASK) is None
    # And a local step 10 (an older run of the task here) is superseded by the shared 25
    _write(tmp_path / "c", 10)
    assert checkpoint_sync.fetch(storage, tmp_path / "c", TASK) == 25
    assert checkpoint.latest(tmp_path / "c", TASK) == (25, checkpoint.folder(tmp_path / "c", TASK) / "step-000000025")


def test_a_tampered_shared_checkpoint_is_refused_and_leaves_nothing(storage: SharedStorage, tmp_path: Path) -> None:
    # Given an uploaded checkpoint whose state file is then replaced by other bytes of the same size
    _write(tmp_path / "a", 25)
    checkpoint_sync.upload(storage, tmp_path / "a", TASK)
    key = f"checkpoints/{TASK}/step-000000025/{checkpoint.STATE}"
    original = storage.get_bytes(key) or b""
    storage.put_bytes(key, original[:-1] + b"X")
    # When another worker fetches it, Then the download refuses it, and its store has no checkpoint of the task
    with pytest.raises(SharedStorageError, match="tampered or corrupt"):
        checkpoint_sync.fetch(storage, tmp_path / "b", TASK)
    assert checkpoint.latest(tmp_path / "b", TASK) is None
    assert not [p for p in checkpoint.folder(tmp_path / "b", TASK).iterdir() if p.name.startswith(".tmp-")]
    # And a longer file is refused at its recorded size, a bad record by name
    storage.put_bytes(key, original + b"more")
    with pytest.raises(SharedStorageError, match="larger than"):
        checkpoint_sync.fetch(storage, tmp_path / "b", TASK)
    storage.put_bytes(f"checkpoints/{TASK}/latest.json", b'{"format": 1, "step": "../x"}')
    with pytest.raises(SharedStorageError, match="not a checkpoint record"):
        checkpoint_sync.fetch(storage, tmp_path / "b", TASK)


def test_discard_deletes_the_record_and_every_file(storage: SharedStorage, tmp_path: Path) -> None:
    # Given an upload and a half-finished one of a later step (a worker killed mid-upload)
    _write(tmp_path / "a", 25)
    checkpoint_sync.upload(storage, tmp_path / "a", TASK)
    storage.put_bytes(f"checkpoints/{TASK}/step-000000050/state.safetensors", b"half")
    storage.put_bytes("checkpoints/another-task/latest.json", b"{}")
    # When the task's shared checkpoint is discarded, Then all of it goes, another task's stays
    assert checkpoint_sync.discard(storage, TASK) is True
    assert _keys(storage) == {"checkpoints/another-task/latest.json"}
    assert checkpoint_sync.discard(storage, TASK) is False


class Killed(Exception):
    """Stands for a kill -9 in the middle of training."""


class _Failing(LocalStorage):
    """A storage whose writes fail (the network is down)."""

    def write(self, key: str, source: IO[bytes]) -> None:
        raise SharedStorageError(f"cannot write {key}: network down")


class _Slow(LocalStorage):
    """A storage that takes a while per chunk, to close an uploader mid-upload."""

    def write(self, key: str, source: IO[bytes]) -> None:
        def slow() -> Iterator[bytes]:
            while chunk := source.read(1024):
                time.sleep(0.01)
                yield chunk
        data = b"".join(slow())
        super().write(key, _Bytes(data))


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int = -1) -> bytes:
        chunk, self.data = (self.data, b"") if size < 0 else (self.data[:size], self.data[size:])
        return chunk


def test_the_uploader_copies_in_the_background_and_failures_only_log(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # Given an uploader on a working storage
    shared = LocalStorage(tmp_path / "shared")
    _write(tmp_path / "a", 25)
    uploader = checkpoint_sync.Uploader(shared, tmp_path / "a", TASK)
    # When it is told a checkpoint was written, Then the storage gets it without the caller waiting
    uploader.written()
    deadline = time.monotonic() + 60
    while uploader.uploaded is None and time.monotonic() < deadline:
        time.sleep(0.02)
    uploader.close()
    assert uploader.uploaded == 25 and shared.exists(f"checkpoints/{TASK}/latest.json")
    # Given a storage that fails, When told, Then the failure is logged and nothing is raised
    failing = checkpoint_sync.Uploader(_Failing(tmp_path / "down"), tmp_path / "a", TASK)
    with caplog.at_level(logging.WARNING, logger="hypha_celery.training.checkpoints.sync"):
        failing.written()
        deadline = time.monotonic() + 60
        while "network down" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        failing.close()
    assert "checkpoint upload to shared storage failed" in caplog.text and failing.uploaded is None
    # Given a slow upload in flight, When closed, Then it stops before writing the record
    _write(tmp_path / "big", 25, b"x" * 400_000)
    slow = checkpoint_sync.Uploader(_Slow(tmp_path / "slow"), tmp_path / "big", TASK)
    slow.written()
    time.sleep(0.1)
    slow.close()
    assert slow.uploaded is None and not (tmp_path / "slow" / f"checkpoints/{TASK}/latest.json").exists()


def test_a_run_killed_on_one_store_resumes_on_another_through_shared_storage(tmp_path: Path) -> None:
    import torch

    from hypha_celery.training.finetune.run import finetune

    torch.set_num_threads(1)
    init_examples(tmp_path / "a")  # B: a copy of A (the same models, manifest sha256s), another machine's disk
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns(".locks"))
    stores = [ModelStore(tmp_path / name) for name in ("a", "b")]
    shared = LocalStorage(tmp_path / "shared")
    request = Train(model=TINY_LLAMA, new_model="resumed", epochs=1, batch_size=2, max_steps=8, lr=1e-2, seed=3,
                    method="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0}, checkpoint_every=3,
                    progress_interval=0.0, task_id=TASK)
    told: list[int] = []

    def progress(update: Progress) -> None:  # the worker's side: upload when told, then the worker "dies" at step 5
        if update.checkpoint_step is not None:
            told.append(update.checkpoint_step)
            checkpoint_sync.upload(shared, stores[0].root, TASK)
        if update.step == 5:
            raise Killed(update.step)

    # Given a run on store A killed at step 5, after its checkpoint at step 3 reached the shared storage
    with pytest.raises(Killed):
        finetune(stores[0], request, {"texts": TEXTS}, "cpu", progress)
    assert told == [3]
    # When store B (which never saw the run) fetches it and runs the task
    assert checkpoint_sync.fetch(shared, stores[1].root, TASK) == 3
    result = finetune(stores[1], request, {"texts": TEXTS}, "cpu", lambda update: None)
    # Then the run resumed at step 3 and finished all 8 steps
    assert result.trained.resumed_from_step == 3 and result.trained.checkpoint_refused is None
    assert result.trained.steps == 8

