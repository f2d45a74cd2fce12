"""DiLoCo's shared storage, on a local folder and on S3 (moto in process): streamed puts and gets, sha256 checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypha_celery.config.parse import parse_config
from hypha_celery.config.schema import ModelSource
from hypha_celery.errors import ConfigError, SharedStorageError
from hypha_celery.models.shared_storage import LocalStorage, SharedStorage, models_source, open_storage


def test_a_file_goes_in_and_comes_back_with_its_sha256(storage: SharedStorage, tmp_path: Path) -> None:
    # Given a file larger than one streaming chunk
    source = tmp_path / "delta.bin"
    source.write_bytes(bytes(range(256)) * 9000)
    # When it is put and got back with the sha256 the put reported
    stored = storage.put_file("jobs/j1/round-1/t1.safetensors", source)
    back = storage.get_file("jobs/j1/round-1/t1.safetensors", tmp_path / "back.bin", sha256=stored.sha256)
    # Then the bytes, size and hash are the same, and the key exists
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    assert back == stored and stored.size == source.stat().st_size
    assert storage.exists("jobs/j1/round-1/t1.safetensors") and not storage.exists("jobs/j1/round-1/t2.safetensors")


def test_an_object_that_is_not_the_reported_sha256_is_refused(storage: SharedStorage, tmp_path: Path) -> None:
    # Given an object stored, then replaced by other bytes under the same key
    stored = storage.put_bytes("jobs/j1/round-1/t1.safetensors", b"the worker's delta")
    storage.put_bytes("jobs/j1/round-1/t1.safetensors", b"someone else's delta")
    # When it is read expecting the first sha256, Then it is refused and nothing is left behind
    with pytest.raises(SharedStorageError, match="tampered or corrupt"):
        storage.get_file("jobs/j1/round-1/t1.safetensors", tmp_path / "got", sha256=stored.sha256)
    assert not (tmp_path / "got").exists()


def test_delete_removes_an_object_or_a_folder_of_them(storage: SharedStorage) -> None:
    # Given objects in a folder, one beside it, and one whose name starts like the folder's
    for key in ("jobs/j1/a", "jobs/j1/sub/b", "jobs/j1x", "jobs/j2"):
        storage.put_bytes(key, b"x")
    # When the folder and an object are deleted (and something that is not there)
    storage.delete("jobs/j1")
    storage.delete("jobs/j2")
    storage.delete("jobs/none")
    # Then only the unrelated object is left
    assert [key for key in ("jobs/j1/a", "jobs/j1/sub/b", "jobs/j1x", "jobs/j2") if storage.exists(key)] == ["jobs/j1x"]


def test_missing_objects_caps_and_bad_keys_are_named_errors(storage: SharedStorage, tmp_path: Path) -> None:
    # Given an empty storage, Then a missing object reads as None (small) or an error (files)
    assert storage.get_bytes("jobs/none/aggregate.json") is None
    with pytest.raises(SharedStorageError):
        storage.get_file("jobs/none/x.safetensors", tmp_path / "x")
    # And an object over the cap is refused, and a key cannot climb out of the storage
    storage.put_bytes("big", b"x" * 100)
    with pytest.raises(SharedStorageError, match="larger than 10 bytes"):
        storage.get_file("big", tmp_path / "big", max_size=10)
    for bad in ("../etc/passwd", "/abs", "a//b", "a/../b", ""):
        with pytest.raises(SharedStorageError, match="bad shared-storage key"):
            storage.put_bytes(bad, b"x")


def test_the_models_folder_is_a_model_source() -> None:
    # Given storages described as config tables, Then their models/ folder reads as a model source
    assert models_source(ModelSource(type="local", path="/mnt/shared")).path == "/mnt/shared/models"
    s3 = models_source(ModelSource(type="s3", bucket="b", prefix="runs/"))
    assert (s3.type, s3.bucket, s3.prefix) == ("s3", "b", "runs/models/")
    assert isinstance(open_storage(ModelSource(type="local", path="/mnt/shared")), LocalStorage)


@pytest.mark.parametrize(("table", "key", "words"), [
    ({"type": "http", "url": "http://x"}, "worker.training.shared_storage.type", "read-only"),
    ({"type": "s3"}, "worker.training.shared_storage.bucket", "required"),
    ({"type": "local", "pth": "/x"}, "worker.training.shared_storage.pth", "did you mean 'path'"),
    ("s3://bucket", "worker.training.shared_storage", "table"),
])
def test_a_bad_shared_storage_names_the_key(table: object, key: str, words: str) -> None:
    # When the config names a storage that cannot be written, Then the error names the key and why
    with pytest.raises(ConfigError) as caught:
        parse_config({"worker": {"training": {"shared_storage": table}}})
    assert caught.value.key == key and words in caught.value.reason


def test_a_good_shared_storage_parses() -> None:
    cfg = parse_config({"worker": {"training": {"shared_storage": {"type": "s3", "bucket": "b", "prefix": "runs"}}}})
    assert cfg.training.shared_storage == ModelSource(type="s3", bucket="b", prefix="runs/")
    assert parse_config({}).training.shared_storage is None


@pytest.mark.parametrize("plant", ["file", "folder"])
def test_a_link_planted_in_a_shared_folder_is_refused_not_read(tmp_path: Path, plant: str) -> None:
    # Given a shared folder where someone with write access planted a link to a host file (or a linked folder)
    secret = tmp_path / "host" / "worker.toml"
    secret.parent.mkdir()
    secret.write_bytes(b"signing_key = 'do-not-leak'\n")
    storage = LocalStorage(tmp_path / "shared")
    (tmp_path / "shared" / "jobs").mkdir(parents=True)
    if plant == "file":
        (tmp_path / "shared" / "jobs" / "momentum-1.safetensors").symlink_to(secret)
    else:
        (tmp_path / "host" / "momentum-1.safetensors").write_bytes(secret.read_bytes())
        (tmp_path / "shared" / "jobs").rmdir()
        (tmp_path / "shared" / "jobs").symlink_to(tmp_path / "host", target_is_directory=True)
    # When a worker reads it (a get without a sha256, as the outer momentum is read), or reads it as a small record
    with pytest.raises(SharedStorageError, match="symbolic link"):
        storage.get_file("jobs/momentum-1.safetensors", tmp_path / "got")
    with pytest.raises(SharedStorageError, match="symbolic link"):
        storage.get_bytes("jobs/momentum-1.safetensors")
    # Then the host file was never copied
    assert not (tmp_path / "got").exists()


def test_a_fifo_planted_in_a_shared_folder_is_refused_without_waiting(tmp_path: Path) -> None:
    # Given a FIFO where a delta should be (a reader that opened it would wait for a writer forever)
    storage = LocalStorage(tmp_path / "shared")
    (tmp_path / "shared" / "jobs").mkdir(parents=True)
    os.mkfifo(tmp_path / "shared" / "jobs" / "t1.safetensors")
    # When it is read, Then it is refused at once as not a regular file
    with pytest.raises(SharedStorageError, match="is a FIFO"):
        storage.get_file("jobs/t1.safetensors", tmp_path / "got", max_size=10)


def test_an_object_above_the_cap_is_refused_from_its_stated_size(storage: SharedStorage, tmp_path: Path) -> None:
    # Given an object of 100 bytes (S3 states its ContentLength, a folder its file's size)
    storage.put_bytes("big", b"x" * 100)
    # When it is got with a 10-byte cap, Then it is refused from the stated size, before its body is read
    with pytest.raises(SharedStorageError, match=r"100 announced\); refused before downloading it"):
        storage.get_file("big", tmp_path / "big", max_size=10)
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("put", ["write", "put_file", "put_bytes"])
def test_a_write_through_a_linked_folder_is_refused(tmp_path: Path, put: str) -> None:
    # Given a shared folder where someone planted run1 -> a folder outside it
    outside = tmp_path / "outside"
    outside.mkdir()
    storage = LocalStorage(tmp_path / "shared")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "run1").symlink_to(outside, target_is_directory=True)
    source = tmp_path / "delta.bin"
    source.write_bytes(b"a delta")
    # When a worker writes an object under run1/ (or a folder below it)
    for key in ("run1/delta.bin", "run1/sub/delta.bin"):
        with pytest.raises(SharedStorageError, match=r"run1 is a symbolic link: refused"):
            if put == "write":
                with open(source, "rb") as handle:
                    storage.write(key, handle)
            elif put == "put_file":
                storage.put_file(key, source)
            else:
                storage.put_bytes(key, b"a delta")
    # Then nothing was created outside the storage
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("victim", ["run1/victim", "run1/victim.bin", "linked"])
def test_a_delete_through_or_of_a_link_is_refused(tmp_path: Path, victim: str) -> None:
    # Given a shared folder with run1 -> a folder outside it, and linked -> a folder outside, full of host files
    outside = tmp_path / "outside"
    (outside / "victim").mkdir(parents=True)
    (outside / "victim" / "keep.txt").write_bytes(b"host data")
    (outside / "victim.bin").write_bytes(b"host data")
    storage = LocalStorage(tmp_path / "shared")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "run1").symlink_to(outside, target_is_directory=True)
    (tmp_path / "shared" / "linked").symlink_to(outside / "victim", target_is_directory=True)
    # When a worker deletes a key that lies under the link, or is the link
    with pytest.raises(SharedStorageError, match="is a symbolic link"):
        storage.delete(victim)
    # Then nothing outside the storage was removed, and the planted link is left for an operator to see
    assert (outside / "victim" / "keep.txt").read_bytes() == b"host data" and (outside / "victim.bin").exists()
    assert (tmp_path / "shared" / "linked").is_symlink()
