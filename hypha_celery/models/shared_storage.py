"""Shared storage: DiLoCo rounds keep pseudo-gradients, momentum and global versions here, tasks checkpoints.

The model sources (:mod:`.sources`) only read; DiLoCo's workers also write, so
this is their writable counterpart over the same two places a fleet shares: a
local folder every worker mounts, or an S3 bucket (boto3). It is configured per
worker (``[worker.training] shared_storage``, a ``ModelSource``-shaped table of
type ``local`` or ``s3``). Keys are ``/``-separated model-id components; under ``models/`` the
storage holds global model versions in the store's layout and doubles as a model source
(:meth:`SharedStorage.models_source`). Which key holds what is spelled once per user:
:mod:`hypha_celery.training.distributed.layout` (a DiLoCo job's deltas, records, momentum and
versions) and :mod:`hypha_celery.training.checkpoints.sync` (a training task's checkpoints).

Objects are streamed in 1 MiB chunks both ways; :meth:`SharedStorage.get_file`
hashes what it reads and refuses a file whose sha256 is not the one expected
(``SharedStorageError``), so a delta altered after its inner task reported it
never reaches the outer step. A local ``put`` writes a temporary file and
renames it, so a reader sees a whole object or none; S3 puts are atomic.
A local read follows no link below the folder and opens only regular files
(a link or FIFO planted in a shared mount is refused, not read); a local
write or delete refuses a key with a link among its folders (or, for a
delete, a key that is itself a link), so it never reaches outside; and a get
with a size cap refuses an object whose stated size is over it before
reading it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hypha_celery.config.schema import ModelSource
from hypha_celery.errors import SharedStorageError
from hypha_celery.formats.safe_files import open_regular
from hypha_celery.manifest import is_model_id

__all__ = ["LocalStorage", "S3Storage", "SharedStorage", "Stored", "check_key", "models_source", "open_storage"]

_CHUNK = 1 << 20
MODELS = "models"


@dataclass(frozen=True)
class Stored:
    """What a put wrote or a get read: the object's sha256 and size."""

    sha256: str
    size: int


def check_key(key: str) -> str:
    """A key of model-id components joined by ``/``: nothing can name a place outside the storage."""
    parts = key.split("/")
    if not parts or not all(is_model_id(part) for part in parts):
        raise SharedStorageError(f"bad shared-storage key {key!r}: '/'-separated names of [A-Za-z0-9_.-], no '..'")
    return key


class SharedStorage:
    """A writable store of named objects; subclasses open streams, this class hashes and checks them."""

    def open_read(self, key: str) -> IO[bytes]:
        raise NotImplementedError

    def open_sized(self, key: str) -> tuple[IO[bytes], int | None]:
        """``open_read``, and the object's size when the storage states it before the first byte is read."""
        return self.open_read(key), None

    def write(self, key: str, source: IO[bytes]) -> None:
        """Store the whole readable ``source`` under ``key`` atomically."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove the object ``key`` and every object under ``key/`` (a folder of them); nothing there is no error."""
        raise NotImplementedError

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
        hashing = _Hashing(source)
        self.write(check_key(key), hashing)  # type: ignore[arg-type]  # a readable with read(); boto3 needs no more
        return Stored(hashing.digest.hexdigest(), hashing.size)

    def put_bytes(self, key: str, data: bytes) -> Stored:
        hashing = _Hashing(io.BytesIO(data))
        self.write(check_key(key), hashing)  # type: ignore[arg-type]
        return Stored(hashing.digest.hexdigest(), hashing.size)

    def get_file(self, key: str, dest: Path, *, sha256: str | None = None, max_size: int | None = None) -> Stored:
        """Download ``key`` to ``dest``, refusing it (and removing ``dest``) when it is not ``sha256`` or too large."""
        check_key(key)
        digest, size = hashlib.sha256(), 0
        stream, announced = self.open_sized(key)
        if max_size is not None and announced is not None and announced > max_size:
            stream.close()
            raise SharedStorageError(f"{self.describe(key)} is larger than {max_size} bytes ({announced} announced); "
                                     "refused before downloading it")
        try:
            with stream, open(dest, "wb") as out:
                for chunk in _chunks(stream):
                    size += len(chunk)
                    if max_size is not None and size > max_size:
                        raise SharedStorageError(f"{self.describe(key)} is larger than {max_size} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise SharedStorageError(f"{self.describe(key)}: sha256 {digest.hexdigest()[:12]}... is not the "
                                         f"{sha256[:12]}... it was reported with (tampered or corrupt)")
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return Stored(digest.hexdigest(), size)

    def get_bytes(self, key: str, max_size: int = 1 << 20) -> bytes | None:
        """A small object (JSON records), or None when there is none."""
        check_key(key)
        if not self.exists(key):
            return None
        stream, announced = self.open_sized(key)
        with stream:
            if announced is not None and announced > max_size:
                raise SharedStorageError(f"{self.describe(key)} is larger than {max_size} bytes ({announced} announced)")
            data = stream.read(max_size + 1)
        if len(data) > max_size:
            raise SharedStorageError(f"{self.describe(key)} is larger than {max_size} bytes")
        return bytes(data)

    def describe(self, key: str) -> str:
        return key


class LocalStorage(SharedStorage):
    """A folder (a shared mount): objects are files under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def describe(self, key: str) -> str:
        return str(self._path(key))

    def open_read(self, key: str) -> IO[bytes]:
        return self.open_sized(key)[0]

    def open_sized(self, key: str) -> tuple[IO[bytes], int | None]:
        """The file at ``key``, opened without following a link below ``root`` (a planted one is refused), and its size."""
        try:
            handle = os.fdopen(open_regular(self.root, check_key(key), refuse=SharedStorageError), "rb")
        except FileNotFoundError:
            raise SharedStorageError(f"{self.describe(key)} does not exist") from None
        except OSError as exc:
            raise SharedStorageError(f"cannot read {self.describe(key)}: {exc.strerror}") from None
        return handle, os.fstat(handle.fileno()).st_size

    def _checked(self, key: str, *, make: bool) -> Path:
        """``key``'s path, each folder on the way below ``root`` ``lstat``-ed a real folder, not a link.

        A planted ``run1 -> /outside`` would otherwise take a write or a delete out of the storage. Missing
        folders are made when ``make``, else ``FileNotFoundError``; ``root`` itself may be a link (the operator's).
        """
        folder = self.root
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        parts = check_key(key).split("/")
        for part in parts[:-1]:
            folder = folder / part
            if make and not os.path.lexists(folder):
                folder.mkdir(exist_ok=True)
            found = os.lstat(folder)
            if not stat.S_ISDIR(found.st_mode):
                what = "a symbolic link" if stat.S_ISLNK(found.st_mode) else "not a folder"
                raise SharedStorageError(f"{self.describe(key)}: {folder} is {what}: refused")
        return folder / parts[-1]

    def write(self, key: str, source: IO[bytes]) -> None:
        try:
            target = self._checked(key, make=True)
            descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
        except OSError as exc:
            raise SharedStorageError(f"cannot write {self.describe(key)}: {exc.strerror}") from None
        try:
            with os.fdopen(descriptor, "wb") as out:
                for chunk in _chunks(source):
                    out.write(chunk)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """As :meth:`SharedStorage.delete`; a link on the way, or as the object itself, is refused, not followed."""
        try:
            path = self._checked(key, make=False)
            found = os.lstat(path)
            if stat.S_ISLNK(found.st_mode):
                raise SharedStorageError(f"{self.describe(key)} is a symbolic link: refused")
            if stat.S_ISDIR(found.st_mode):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SharedStorageError(f"cannot delete {self.describe(key)}: {exc.strerror}") from None

    def models_source(self) -> ModelSource:
        return ModelSource(type="local", path=str(self.root / MODELS))


class S3Storage(SharedStorage):
    """An S3 bucket (or any S3 API: MinIO, moto) under ``prefix``; credentials from boto3's usual chain."""

    def __init__(self, bucket: str, *, region: str | None = None, endpoint_url: str | None = None,
                 prefix: str = "") -> None:
        try:
            import boto3
        except ImportError:
            raise SharedStorageError("S3 shared storage needs boto3: install hypha-celery[s3]") from None
        self.bucket, self.region, self.endpoint_url = bucket, region, endpoint_url
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.client = boto3.client("s3", region_name=region, endpoint_url=endpoint_url)

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def open_read(self, key: str) -> IO[bytes]:
        return self.open_sized(key)[0]

    def open_sized(self, key: str) -> tuple[IO[bytes], int | None]:
        """The object's body and the ``ContentLength`` S3 states with it."""
        import botocore.exceptions

        try:
            reply: Any = self.client.get_object(Bucket=self.bucket, Key=self.prefix + check_key(key))
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise SharedStorageError(f"{self.describe(key)}: {code}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise SharedStorageError(f"{self.describe(key)}: {exc}") from None
        length = reply.get("ContentLength")
        return reply["Body"], length if isinstance(length, int) else None

    def write(self, key: str, source: IO[bytes]) -> None:
        import botocore.exceptions

        try:  # upload_fileobj streams in parts (multipart above its threshold)
            self.client.upload_fileobj(source, self.bucket, self.prefix + check_key(key))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise SharedStorageError(f"cannot write {self.describe(key)}: {exc}") from None

    def exists(self, key: str) -> bool:
        import botocore.exceptions

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + check_key(key))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise SharedStorageError(f"{self.describe(key)}: {exc}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise SharedStorageError(f"{self.describe(key)}: {exc}") from None
        return True

    def delete(self, key: str) -> None:
        import botocore.exceptions

        name = self.prefix + check_key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=name)
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=name + "/")
            for page in pages:
                batch = [{"Key": entry["Key"]} for entry in page.get("Contents", [])]
                if batch:  # at most 1,000 a page, as many as one delete_objects takes
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise SharedStorageError(f"cannot delete {self.describe(key)}: {exc}") from None

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


class _Hashing:
    """A reader that hashes and counts what passes through it (the sha256 of an upload, in one read)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def _chunks(stream: Any) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK):
        yield chunk
