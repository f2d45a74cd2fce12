"""One byte layer for the places a fleet shares: a local folder, HTTP, an S3 bucket.

Model sources (:mod:`.sources`, read-only) and shared storage (:mod:`.shared_storage`, read and
write) both move bytes through here, so a security property holds for both or neither. A place
opens a ``/``-separated key as a :class:`Reader`: the size the place announced before the first
byte (a local file's size, HTTP ``Content-Length``, S3 ``ContentLength``) when it did, and transport
errors while reading (a reset, a cut chunked body) raised as the place's own error. A local folder
is read as an import reads a model folder: no link below it is followed and only regular files with
one link are opened (:func:`~hypha_celery.formats.safe_files.open_regular`); a local write or delete
``lstat``-s each folder on the way and refuses a link among them, so it never reaches outside, and a
write is a temporary file renamed into place (a reader sees a whole object or none; S3 puts are
atomic). :func:`copy` and :func:`read_small` stream in 1 MiB chunks, hashing and counting, and stop
at a byte cap while the bytes arrive; what a copy must match (a manifest's size and sha256, a
reported digest) is its caller's to say.

Each place raises the error class it was made with (``UnsupportedModel`` for a source,
``SharedStorageError`` for shared storage): the caller's error tree, one implementation.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from hypha_celery.errors import HyphaError
from hypha_celery.formats.safe_files import open_regular

__all__ = ["HTTP_TIMEOUT_S", "Hashing", "Http", "LocalFolder", "Place", "Reader", "S3Bucket", "Stored",
           "Writable", "copy", "read_small"]

CHUNK = 1 << 20
HTTP_TIMEOUT_S = 30


@dataclass(frozen=True)
class Stored:
    """What a copy or a put moved: the bytes' sha256 and their count."""

    sha256: str
    size: int


class Reader:
    """A readable stream, closed on exit, whose transport ``errors`` while reading become ``error``.

    A download can break off after its headers (connection reset, timeout, a chunked body cut
    short): that is a failed read of the place, in the caller's terms.
    """

    def __init__(self, stream: Any, what: str, error: type[HyphaError],
                 errors: tuple[type[BaseException], ...] = (OSError,), length: int | None = None) -> None:
        self.stream = stream
        self.what = what
        self.error = error
        self.errors = errors
        self.length = length  # the size the place announced before the body, when it did

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stream.close()

    def read(self, size: int = -1) -> bytes:
        try:
            return bytes(self.stream.read(size))
        except self.errors as exc:
            raise self.error(f"{self.what}: download interrupted, truncated ({type(exc).__name__}: {exc})") from None


class Place(Protocol):
    """Somewhere keys can be read from."""

    def describe(self, key: str) -> str:
        """Where ``key`` is, for a message (a path, a URL, an ``s3://`` address)."""
        ...

    def open(self, key: str) -> Reader: ...


class Writable(Place, Protocol):
    """A place that is written too (a shared folder, a bucket)."""

    def write(self, key: str, source: IO[bytes]) -> None:
        """Store the whole readable ``source`` under ``key`` atomically."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove ``key`` and every key under ``key/``; nothing there is no error."""
        ...


def chunks(stream: Any) -> Iterator[bytes]:
    """``stream``'s bytes, 1 MiB at a time."""
    while chunk := stream.read(CHUNK):
        yield chunk


def copy(reader: Reader, out: IO[bytes], *, limit: int | None = None, over: str = "") -> Stored:
    """Stream ``reader`` into ``out``, hashing and counting; past ``limit`` bytes, ``reader.error(over)`` is raised
    before the extra bytes are written."""
    digest, size = hashlib.sha256(), 0
    for chunk in chunks(reader):
        size += len(chunk)
        if limit is not None and size > limit:
            raise reader.error(over)
        digest.update(chunk)
        out.write(chunk)
    return Stored(digest.hexdigest(), size)


def read_small(reader: Reader, cap: int) -> bytes:
    """A small object (a manifest, a JSON record) whole: refused when announced or found above ``cap`` bytes."""
    with reader:
        if reader.length is not None and reader.length > cap:
            raise reader.error(f"{reader.what} is larger than {cap} bytes ({reader.length} announced)")
        data = reader.read(cap + 1)
    if len(data) > cap:
        raise reader.error(f"{reader.what} is larger than {cap} bytes")
    return data


class Hashing:
    """A reader that hashes and counts what passes through it (the sha256 of an upload, in one read)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.digest.update(data)
        self.size += len(data)
        return bytes(data)

    def stored(self) -> Stored:
        return Stored(self.digest.hexdigest(), self.size)


class LocalFolder:
    """Keys as files under ``root`` (a mounted folder): read without following links, written without crossing one."""

    def __init__(self, root: str | os.PathLike[str], error: type[HyphaError]) -> None:
        self.root = Path(root)
        self.error = error

    def describe(self, key: str) -> str:
        return str(self.root / key)

    def open(self, key: str) -> Reader:
        """The file at ``key``, opened without following a link below ``root`` (a planted one is refused), and its size."""
        try:
            handle = os.fdopen(open_regular(self.root, key, refuse=self.error), "rb")
        except FileNotFoundError:
            raise self.error(f"not found at {self.describe(key)}") from None
        except OSError as exc:
            raise self.error(f"cannot read {self.describe(key)}: {exc.strerror}") from None
        return Reader(handle, self.describe(key), self.error, length=os.fstat(handle.fileno()).st_size)

    def _checked(self, key: str, *, make: bool) -> Path:
        """``key``'s path, each folder on the way below ``root`` ``lstat``-ed a real folder, not a link.

        A planted ``run1 -> /outside`` would otherwise take a write or a delete out of the folder. Missing
        folders are made when ``make``, else ``FileNotFoundError``; ``root`` itself may be a link (the operator's).
        """
        folder = self.root
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        parts = key.split("/")
        for part in parts[:-1]:
            folder = folder / part
            if make and not os.path.lexists(folder):
                folder.mkdir(exist_ok=True)
            found = os.lstat(folder)
            if not stat.S_ISDIR(found.st_mode):
                what = "a symbolic link" if stat.S_ISLNK(found.st_mode) else "not a folder"
                raise self.error(f"{self.describe(key)}: {folder} is {what}: refused")
        return folder / parts[-1]

    def write(self, key: str, source: IO[bytes]) -> None:
        try:
            target = self._checked(key, make=True)
            descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
        except OSError as exc:
            raise self.error(f"cannot write {self.describe(key)}: {exc.strerror}") from None
        try:
            with os.fdopen(descriptor, "wb") as out:
                for chunk in chunks(source):
                    out.write(chunk)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def delete(self, key: str) -> None:
        """A link on the way, or as the object itself, is refused, not followed."""
        try:
            path = self._checked(key, make=False)
            found = os.lstat(path)
            if stat.S_ISLNK(found.st_mode):
                raise self.error(f"{self.describe(key)} is a symbolic link: refused")
            if stat.S_ISDIR(found.st_mode):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self.error(f"cannot delete {self.describe(key)}: {exc.strerror}") from None


class Http:
    """Keys under a base URL, read with GET (the scheme was checked with the configuration)."""

    def __init__(self, url: str, error: type[HyphaError]) -> None:
        self.url = url.rstrip("/")
        self.error = error

    def describe(self, key: str) -> str:
        return f"{self.url}/{key}"

    def open(self, key: str) -> Reader:
        url = self.describe(key)
        try:
            response = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)  # noqa: S310 - scheme checked in config
        except urllib.error.HTTPError as exc:
            exc.close()
            raise self.error(f"GET {url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self.error(f"GET {url}: {getattr(exc, 'reason', exc)}") from None
        length = response.headers.get("Content-Length")
        announced = int(length) if length is not None and length.isdigit() else None
        return Reader(response, f"GET {url}", self.error, (OSError, http.client.HTTPException), announced)


class S3Bucket:
    """Keys under ``prefix`` in an S3 bucket (or any S3 API: MinIO, moto); credentials from boto3's usual chain."""

    def __init__(self, bucket: str, error: type[HyphaError], *, region: str | None = None,
                 endpoint_url: str | None = None, prefix: str = "") -> None:
        try:
            import boto3
        except ImportError:
            raise error("S3 storage needs boto3: install hypha-celery[s3]") from None
        self.bucket, self.region, self.endpoint_url, self.prefix = bucket, region, endpoint_url, prefix
        self.error = error
        self.client = boto3.client("s3", region_name=region, endpoint_url=endpoint_url)

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _failed(self, key: str, exc: Exception, doing: str | None = None) -> Exception:
        """An S3 error as the place's error: a failed read by the client error's code, anything else as said."""
        import botocore.exceptions

        if isinstance(exc, botocore.exceptions.ClientError) and doing is None:
            return self.error(f"{self.describe(key)}: {exc.response.get('Error', {}).get('Code', 'error')}")
        return self.error(f"{doing or ''}{self.describe(key)}: {exc}")

    def open(self, key: str) -> Reader:
        """The object's body and the ``ContentLength`` S3 states with it."""
        import botocore.exceptions

        try:
            reply: Any = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._failed(key, exc) from None
        length = reply.get("ContentLength")
        return Reader(reply["Body"], self.describe(key), self.error, (OSError, botocore.exceptions.BotoCoreError),
                      length if isinstance(length, int) else None)

    def write(self, key: str, source: IO[bytes]) -> None:
        import botocore.exceptions

        try:  # upload_fileobj streams in parts (multipart above its threshold)
            self.client.upload_fileobj(source, self.bucket, self.prefix + key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._failed(key, exc, "cannot write ") from None

    def exists(self, key: str) -> bool:
        import botocore.exceptions

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._failed(key, exc, "") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._failed(key, exc, "") from None
        return True

    def delete(self, key: str) -> None:
        import botocore.exceptions

        name = self.prefix + key
        try:
            self.client.delete_object(Bucket=self.bucket, Key=name)
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=name + "/")
            for page in pages:
                batch = [{"Key": entry["Key"]} for entry in page.get("Contents", [])]
                if batch:  # at most 1,000 a page, as many as one delete_objects takes
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._failed(key, exc, "cannot delete ") from None
