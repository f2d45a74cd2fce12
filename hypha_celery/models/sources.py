"""Fetch a model from a ``[[worker.models.sources]]`` entry into a staging folder.

Every source serves the same layout as the store (``<id>/manifest.json``,
``<id>/<file>``), read through the one byte layer (:mod:`.bytes`: a local folder,
HTTP, S3). Files are streamed with a size cap and hashed on the way; the store
verifies and installs the staging folder afterwards. A size the source announces
(HTTP ``Content-Length``, an S3 object's ``ContentLength``, a local file's size)
that is not the manifest's refuses the file before its first byte; bytes past the
manifest's size refuse it while it streams. A local source is read as an import
reads a model folder: below its configured path, no link is followed and only
regular files are opened.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.registry import read_manifest
from hypha_celery.manifest import MODEL_MANIFEST, DatasetManifest, Manifest
from hypha_celery.models.bytes import Http, LocalFolder, Place, S3Bucket, copy, read_small
from hypha_celery.units import format_size

if TYPE_CHECKING:
    from hypha_celery.config import ModelSource

__all__ = ["fetch_manifest", "fetch_model", "place_of"]

_MANIFEST_CAP = 1 << 20


def place_of(source: ModelSource) -> Place:
    """Where ``source``'s bytes are, in the byte layer; a failure there is ``UnsupportedModel`` (the next source)."""
    if source.type == "local":
        return LocalFolder(source.path or "", UnsupportedModel)
    if source.type == "http":
        return Http(source.url or "", UnsupportedModel)
    return S3Bucket(source.bucket or "", UnsupportedModel, region=source.region, endpoint_url=source.endpoint_url,
                    prefix=source.prefix)


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
    place = place_of(source)
    manifest, raw = _manifest(place, model_id, max_size, parse, manifest_name)
    for name, entry in manifest.files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)  # 1_Pooling/config.json: the manifest allows it
        with place.open(f"{model_id}/{name}") as stream, open(staging / name, "xb") as out:
            if stream.length is not None and stream.length != entry.size:
                why = "longer than the manifest's" if stream.length > entry.size else "truncated: the manifest says"
                raise UnsupportedModel(f"model {model_id!r}: {stream.what} announces {stream.length} bytes, {why} "
                                       f"{entry.size}; refused before downloading it")
            copied = copy(stream, out, limit=entry.size,
                          over=f"model {model_id!r}: {name} is longer than the manifest's {entry.size} bytes")
        if copied.size != entry.size:
            raise UnsupportedModel(f"model {model_id!r}: {name} ended at {copied.size} of {entry.size} bytes (truncated)")
        if copied.sha256 != entry.sha256:
            raise UnsupportedModel(f"model {model_id!r}: {name} does not match its sha256 (corrupt or tampered)")
    (staging / manifest_name).write_bytes(raw)
    return manifest


def fetch_manifest(source: ModelSource, model_id: str, max_size: int) -> Manifest:
    """Only the validated manifest of ``model_id`` at ``source``: what sizing needs before admission."""
    manifest, _ = _manifest(place_of(source), model_id, max_size, read_manifest, MODEL_MANIFEST)
    assert isinstance(manifest, Manifest)
    return manifest


def _manifest(
    place: Place,
    model_id: str,
    max_size: int,
    parse: Callable[[Any, str, int | None], Manifest | DatasetManifest],
    manifest_name: str,
) -> tuple[Manifest | DatasetManifest, bytes]:
    raw = read_small(place.open(f"{model_id}/{manifest_name}"), _MANIFEST_CAP)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise UnsupportedModel(f"{model_id!r}: manifest is not JSON ({exc})") from None
    manifest = parse(data, model_id, max_size)
    if manifest.size > max_size:
        raise UnsupportedModel(f"model {model_id!r} is {format_size(manifest.size)}, "
                               f"above max_model_size ({format_size(max_size)})")
    return manifest, raw
