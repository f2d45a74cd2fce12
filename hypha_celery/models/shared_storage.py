"""Shared storage: DiLoCo rounds keep pseudo-gradients, momentum and global versions here, tasks checkpoints.

The model sources (:mod:`.sources`) only read; DiLoCo's workers also write, so
this is their writable counterpart over the same two places a fleet shares: a
local folder every worker mounts, or an S3 bucket (boto3), through the same byte
layer (:mod:`.bytes`). It is configured per worker (``[worker.training]
shared_storage``, a ``ModelSource``-shaped table of type ``local`` or ``s3``).
Keys are ``/``-separated model-id components; under ``models/`` the storage holds
global model versions in the store's layout and doubles as a model source
(:meth:`SharedStorage.models_source`). Which key holds what is spelled once per user:
:mod:`hypha_celery.training.distributed.layout` (a DiLoCo job's deltas, records, momentum and
versions) and :mod:`hypha_celery.training.checkpoints.sync` (a training task's checkpoints).

:meth:`SharedStorage.get_file` hashes what it reads and refuses a file whose
sha256 is not the one expected (``SharedStorageError``), so a delta altered after
its inner task reported it never reaches the outer step; a get with a size cap
refuses an object whose stated size is over it before reading it, and stops at
the cap while reading. What the byte layer guarantees (no link followed or
crossed in a local folder, regular files only, atomic puts) holds here as for
the sources.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Any

from hypha_celery.config.schema import ModelSource
from hypha_celery.errors import SharedStorageError
from hypha_celery.manifest import is_model_id
from hypha_celery.models.bytes import Hashing, LocalFolder, Reader, S3Bucket, Stored, Writable, copy, read_small

__all__ = ["LocalStorage", "S3Storage", "SharedStorage", "Stored", "check_key", "models_source", "open_storage"]

MODELS = "models"


def check_key(key: str) -> str:
    """A key of model-id components joined by ``/``: nothing can name a place outside the storage."""
    parts = key.split("/")
    if not parts or not all(is_model_id(part) for part in parts):
        raise SharedStorageError(f"bad shared-storage key {key!r}: '/'-separated names of [A-Za-z0-9_.-], no '..'")
    return key


class SharedStorage:
    """A writable store of named objects over a place of the byte layer; this class checks keys, hashes and caps."""

    def __init__(self, place: Writable) -> None:
        self.place = place

    def describe(self, key: str) -> str:
        return self.place.describe(key)

    def open_sized(self, key: str) -> tuple[Reader, int | None]:
        """The object, and its size when the storage states it before the first byte is read."""
        reader = self.place.open(check_key(key))
        return reader, reader.length

    def write(self, key: str, source: IO[bytes]) -> None:
        """Store the whole readable ``source`` under ``key`` atomically."""
        self.place.write(check_key(key), source)

    def exists(self, key: str) -> bool:
        return self.place.exists(check_key(key))

    def delete(self, key: str) -> None:
        """Remove the object ``key`` and every object under ``key/`` (a folder of them); nothing there is no error."""
        self.place.delete(check_key(key))

    def models_source(self) -> ModelSource:
        """The ``models/`` folder as a read-only model source: workers fetch global versions through the store."""
        raise NotImplementedError

    def put_file(self, key: str, path: Path) -> Stored:
        """Upload the file at ``path``; returns its sha256 and size."""
        check_key(key)
        with open(path, "rb") as handle:
            return self.put_stream(key, handle)

    def put_stream(self, key: str, source: Any) -> Stored:
        """Upload what the readable ``source`` (anything with ``read(size)``) yields; its sha256 and size."""
        hashing = Hashing(source)
        self.write(check_key(key), hashing)  # type: ignore[arg-type]  # a readable with read(); boto3 needs no more
        return hashing.stored()

    def put_bytes(self, key: str, data: bytes) -> Stored:
        return self.put_stream(key, io.BytesIO(data))

    def get_file(self, key: str, dest: Path, *, sha256: str | None = None, max_size: int | None = None) -> Stored:
        """Download ``key`` to ``dest``, refusing it (and removing ``dest``) when it is not ``sha256`` or too large."""
        stream, announced = self.open_sized(key)
        if max_size is not None and announced is not None and announced > max_size:
            stream.close()
            raise SharedStorageError(f"{self.describe(key)} is larger than {max_size} bytes ({announced} announced); "
                                     "refused before downloading it")
        try:
            with stream, open(dest, "wb") as out:
                copied = copy(stream, out, limit=max_size, over=f"{self.describe(key)} is larger than {max_size} bytes")
            if sha256 is not None and copied.sha256 != sha256:
                raise SharedStorageError(f"{self.describe(key)}: sha256 {copied.sha256[:12]}... is not the "
                                         f"{sha256[:12]}... it was reported with (tampered or corrupt)")
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return copied

    def get_bytes(self, key: str, max_size: int = 1 << 20) -> bytes | None:
        """A small object (JSON records), or None when there is none."""
        if not self.exists(key):
            return None
        return read_small(self.open_sized(key)[0], max_size)


class LocalStorage(SharedStorage):
    """A folder (a shared mount): objects are files under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(LocalFolder(root, SharedStorageError))
        self.root = Path(root)

    def models_source(self) -> ModelSource:
        return ModelSource(type="local", path=str(self.root / MODELS))


class S3Storage(SharedStorage):
    """An S3 bucket (or any S3 API: MinIO, moto) under ``prefix``; credentials from boto3's usual chain."""

    def __init__(self, bucket: str, *, region: str | None = None, endpoint_url: str | None = None,
                 prefix: str = "") -> None:
        prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        place = S3Bucket(bucket, SharedStorageError, region=region, endpoint_url=endpoint_url, prefix=prefix)
        super().__init__(place)
        self.bucket, self.region, self.endpoint_url, self.prefix = bucket, region, endpoint_url, prefix
        self.client = place.client

    def models_source(self) -> ModelSource:
        return ModelSource(type="s3", bucket=self.bucket, region=self.region, endpoint_url=self.endpoint_url,
                           prefix=f"{self.prefix}{MODELS}/")


def models_source(spec: ModelSource) -> ModelSource:
    """The ``models/`` folder of the storage ``spec`` describes, as a model source (builds no client)."""
    if spec.type == "local":
        return ModelSource(type="local", path=str(Path(spec.path or "") / MODELS))
    prefix = spec.prefix if not spec.prefix or spec.prefix.endswith("/") else spec.prefix + "/"
    return ModelSource(type="s3", bucket=spec.bucket, region=spec.region, endpoint_url=spec.endpoint_url,
                       prefix=f"{prefix}{MODELS}/")


def open_storage(spec: ModelSource) -> SharedStorage:
    """The storage a ``[worker.training] shared_storage`` table describes."""
    if spec.type == "local":
        return LocalStorage(spec.path or "")
    if spec.type == "s3":
        return S3Storage(spec.bucket or "", region=spec.region, endpoint_url=spec.endpoint_url, prefix=spec.prefix)
    raise SharedStorageError(f"shared storage of type {spec.type!r}: only 'local' and 's3' are writable")
