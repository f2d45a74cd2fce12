"""Fetch a model from a ``[[worker.models.sources]]`` entry into a staging folder.

Every source serves the same layout as the store (``<id>/manifest.json``,
``<id>/<file>``). Files are streamed with a size cap and hashed on the way;
the store verifies and installs the staging folder afterwards. A size the
source announces (HTTP ``Content-Length``, an S3 object's ``ContentLength``, a
local file's size) that is not the manifest's refuses the file before its
first byte; bytes past the manifest's size refuse it while it streams. A
local source is read as an import reads a model folder: below its configured
path, no link is followed and only regular files are opened
(:func:`.safe_files.open_regular`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.registry import read_manifest
from hypha_celery.formats.safe_files import open_regular
from hypha_celery.manifest import MODEL_MANIFEST, DatasetManifest, Manifest
from hypha_celery.units import format_size

if TYPE_CHECKING:
    from hypha_celery.config import ModelSource

__all__ = ["fetch_manifest", "fetch_model"]

_CHUNK = 1 << 20
_MANIFEST_CAP = 1 << 20
HTTP_TIMEOUT_S = 30


def fetch_model(
    source: ModelSource,
    model_id: str,
    staging: Path,
    max_size: int,
    parse: Callable[[Any, str, int | None], Manifest | DatasetManifest] = read_manifest,
    manifest_name: str = MODEL_MANIFEST,
) -> Manifest | DatasetManifest:
    """Download ``model_id`` (a model, or with ``parse``/``manifest_name`` a data set) from ``source``
    into ``staging``; return its validated manifest."""
    opener = _OPENERS[source.type]
    manifest, raw = _manifest(source, model_id, max_size, parse, manifest_name)
    for name, entry in manifest.files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)  # 1_Pooling/config.json: the manifest allows it
        with opener(source, f"{model_id}/{name}") as stream, open(staging / name, "xb") as out:
            if stream.length is not None and stream.length != entry.size:
                why = "longer than the manifest's" if stream.length > entry.size else "truncated: the manifest says"
                raise UnsupportedModel(f"model {model_id!r}: {stream.what} announces {stream.length} bytes, {why} "
                                       f"{entry.size}; refused before downloading it")
            digest, written = hashlib.sha256(), 0
            for chunk in _chunks(stream):
                written += len(chunk)
                if written > entry.size:
                    raise UnsupportedModel(f"model {model_id!r}: {name} is longer than the manifest's {entry.size} bytes")
                digest.update(chunk)
                out.write(chunk)
        if written != entry.size:
            raise UnsupportedModel(f"model {model_id!r}: {name} ended at {written} of {entry.size} bytes (truncated)")
        if digest.hexdigest() != entry.sha256:
            raise UnsupportedModel(f"model {model_id!r}: {name} does not match its sha256 (corrupt or tampered)")
    (staging / manifest_name).write_bytes(raw)
    return manifest


def fetch_manifest(source: ModelSource, model_id: str, max_size: int) -> Manifest:
    """Only the validated manifest of ``model_id`` at ``source``: what sizing needs before admission."""
    manifest, _ = _manifest(source, model_id, max_size, read_manifest, MODEL_MANIFEST)
    assert isinstance(manifest, Manifest)
    return manifest


def _manifest(
    source: ModelSource,
    model_id: str,
    max_size: int,
    parse: Callable[[Any, str, int | None], Manifest | DatasetManifest],
    manifest_name: str,
) -> tuple[Manifest | DatasetManifest, bytes]:
    with _OPENERS[source.type](source, f"{model_id}/{manifest_name}") as stream:
        raw = _read_capped(stream, _MANIFEST_CAP, f"{model_id}/{manifest_name}")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise UnsupportedModel(f"{model_id!r}: manifest is not JSON ({exc})") from None
    manifest = parse(data, model_id, max_size)
    if manifest.size > max_size:
        raise UnsupportedModel(f"model {model_id!r} is {format_size(manifest.size)}, "
                               f"above max_model_size ({format_size(max_size)})")
    return manifest, raw


def _chunks(stream: _Closing) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK):
        yield chunk


def _read_capped(stream: _Closing, cap: int, what: str) -> bytes:
    if stream.length is not None and stream.length > cap:
        raise UnsupportedModel(f"{what} is larger than {cap} bytes ({stream.length} announced)")
    data = stream.read(cap + 1)
    if len(data) > cap:
        raise UnsupportedModel(f"{what} is larger than {cap} bytes")
    return bytes(data)


class _Closing:
    """A readable stream, closed on exit, whose transport ``errors`` while reading become ``UnsupportedModel``.

    A download can break off after its headers (connection reset, timeout, a
    chunked body cut short): that is a failed source, so the store tries the next.
    """

    def __init__(self, stream: Any, what: str, errors: tuple[type[BaseException], ...] = (OSError,),
                 length: int | None = None) -> None:
        self.stream = stream
        self.what = what
        self.errors = errors
        self.length = length  # the size the source announced before the body, when it did

    def __enter__(self) -> _Closing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()

    def read(self, size: int) -> bytes:
        try:
            return bytes(self.stream.read(size))
        except self.errors as exc:
            raise UnsupportedModel(f"{self.what}: download interrupted, truncated ({type(exc).__name__}: {exc})") from None


def _open_local(source: ModelSource, relative: str) -> _Closing:
    path = Path(source.path or "") / relative
    try:
        handle = os.fdopen(open_regular(Path(source.path or ""), relative), "rb")
        return _Closing(handle, str(path), length=os.fstat(handle.fileno()).st_size)
    except FileNotFoundError:
        raise UnsupportedModel(f"not found at {path}") from None
    except OSError as exc:
        raise UnsupportedModel(f"cannot read {path}: {exc.strerror}") from None


def _open_http(source: ModelSource, relative: str) -> _Closing:
    url = f"{(source.url or '').rstrip('/')}/{relative}"
    try:
        response = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)  # noqa: S310 - scheme checked in config
    except urllib.error.HTTPError as exc:
        exc.close()
        raise UnsupportedModel(f"GET {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise UnsupportedModel(f"GET {url}: {getattr(exc, 'reason', exc)}") from None
    length = response.headers.get("Content-Length")
    announced = int(length) if length is not None and length.isdigit() else None
    return _Closing(response, f"GET {url}", (OSError, http.client.HTTPException), announced)


def _open_s3(source: ModelSource, relative: str) -> _Closing:
    import boto3
    import botocore.exceptions

    client = boto3.client("s3", region_name=source.region, endpoint_url=source.endpoint_url)
    key = f"{source.prefix}{relative}"
    try:
        reply = client.get_object(Bucket=source.bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise UnsupportedModel(f"s3://{source.bucket}/{key}: {code}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise UnsupportedModel(f"s3://{source.bucket}/{key}: {exc}") from None
    length = reply.get("ContentLength")
    return _Closing(reply["Body"], f"s3://{source.bucket}/{key}", (OSError, botocore.exceptions.BotoCoreError),
                    length if isinstance(length, int) else None)


_OPENERS: dict[str, Callable[[ModelSource, str], _Closing]] = {
    "local": _open_local,
    "http": _open_http,
    "s3": _open_s3,
}

