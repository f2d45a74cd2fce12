"""What a stored model or data set is: the manifest types, their file names, and their checks.

A model is ``<id>/manifest.json`` (:class:`Manifest`) plus ``weights.safetensors``;
a training data set is ``<id>/dataset.json`` (:class:`DatasetManifest`) plus
``data.json``. Every manifest lists its files, each with a sha256 and a size.

These types are the contract between the store (:mod:`.store`), the sources
that fetch into it (:mod:`.sources`), validation in the worker, and the
executor's runtime; they import neither torch nor the store, so each of those
can import them. A manifest may come from a remote source: ``from_json``
checks it field by field before anything trusts it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

from hypha_celery.errors import UnsupportedModel
from hypha_celery.models.architectures import ARCHITECTURES

__all__ = [
    "DATA",
    "DATASET_FORMAT",
    "DATASET_MANIFEST",
    "FORMAT",
    "MODEL_MANIFEST",
    "WEIGHTS",
    "DatasetManifest",
    "FileEntry",
    "Manifest",
    "is_model_id",
    "validate_model_id",
]

FORMAT = "hypha-model/1"
MODEL_MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
DATASET_FORMAT = "hypha-dataset/1"
DATASET_MANIFEST = "dataset.json"
DATA = "data.json"
# \Z, not $: "$" also matches before a trailing newline, and "mlp\n" is not a valid id.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def is_model_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is one safe path component: a model or data set id."""
    return isinstance(value, str) and bool(_MODEL_ID.match(value)) and ".." not in value


def validate_model_id(model_id: object) -> str:
    """Return ``model_id`` if it is a well-formed id, else raise ``UnsupportedModel``."""
    if not is_model_id(model_id):
        raise UnsupportedModel(
            f"invalid model id {model_id!r}: use letters, digits, '_', '-', '.' "
            "(one name, at most 128 characters, no '..' or '/')"
        )
    return model_id


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


class _Listed:
    """What every manifest has: the files it lists, each with a sha256 and a size."""

    files: dict[str, FileEntry]

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]
        data["files"] = {name: asdict(entry) for name, entry in self.files.items()}
        return data


@dataclass(frozen=True)
class Manifest(_Listed):
    """What a stored model is. ``input_shape`` is per sample (no batch dimension)."""

    id: str
    architecture: str
    config: dict[str, Any]
    input_shape: list[int]
    files: dict[str, FileEntry]
    dtype: str = "float32"
    task: str = "classification"
    batchable: bool = True
    parent: str | None = None
    created_at: float = field(default_factory=time.time)
    format: str = FORMAT

    @classmethod
    def from_json(cls, data: Any, model_id: str, max_size: int | None = None) -> Manifest:
        """Validate a manifest (it may come from a remote source) field by field."""
        def bad(reason: str) -> UnsupportedModel:
            return UnsupportedModel(f"model {model_id!r}: manifest {reason}")

        if not isinstance(data, dict):
            raise bad("is not a JSON object")
        if data.get("format") != FORMAT:
            raise bad(f"has format {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("id") != model_id:
            raise bad(f"is for {data.get('id')!r}, not {model_id!r}")
        if not isinstance(data.get("architecture"), str) or data["architecture"] not in ARCHITECTURES:
            raise bad(f"names unknown architecture {data.get('architecture')!r}")
        shape = data.get("input_shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise bad(f"has an invalid input_shape {shape!r}")
        files = _files(data.get("files"), WEIGHTS, bad, max_size)
        if data.get("dtype", "float32") not in ("float32", "float16", "bfloat16", "float64"):
            raise bad(f"has unsupported dtype {data.get('dtype')!r}")
        if data.get("task", "classification") not in ("classification", "regression"):
            raise bad(f"has unknown task {data.get('task')!r}")
        if not isinstance(data.get("config") or {}, dict):
            raise bad(f"has a config that is not a table: {data.get('config')!r}")
        created_at = data.get("created_at") or 0.0
        if isinstance(created_at, bool) or not isinstance(created_at, (int, float)):
            raise bad(f"has an invalid created_at {created_at!r}")
        if not isinstance(data.get("parent"), (str, type(None))):
            raise bad(f"has an invalid parent {data.get('parent')!r}")
        if not isinstance(data.get("batchable", True), bool):
            raise bad(f"has a non-boolean batchable {data.get('batchable')!r}")
        return cls(
            id=model_id,
            architecture=data["architecture"],
            config=dict(data.get("config") or {}),
            input_shape=list(shape),
            files=files,
            dtype=data.get("dtype", "float32"),
            task=data.get("task", "classification"),
            batchable=data.get("batchable", True),
            parent=data.get("parent"),
            created_at=float(created_at),
        )


@dataclass(frozen=True)
class DatasetManifest(_Listed):
    """A stored training data set: ``data.json`` holds ``{"inputs": [...], "targets": [...]}``."""

    id: str
    rows: int
    files: dict[str, FileEntry]
    created_at: float = field(default_factory=time.time)
    format: str = DATASET_FORMAT

    @classmethod
    def from_json(cls, data: Any, dataset_id: str, max_size: int | None = None) -> DatasetManifest:
        def bad(reason: str) -> UnsupportedModel:
            return UnsupportedModel(f"data set {dataset_id!r}: manifest {reason}")

        if not isinstance(data, dict):
            raise bad("is not a JSON object")
        if data.get("format") != DATASET_FORMAT:
            raise bad(f"has format {data.get('format')!r}, expected {DATASET_FORMAT!r}")
        if data.get("id") != dataset_id:
            raise bad(f"is for {data.get('id')!r}, not {dataset_id!r}")
        rows = data.get("rows")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
            raise bad(f"has an invalid row count {rows!r}")
        created = data.get("created_at") or 0.0
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            raise bad(f"has an invalid created_at {created!r}")
        return cls(id=dataset_id, rows=rows, files=_files(data.get("files"), DATA, bad, max_size),
                   created_at=float(created))


def _files(
    raw: Any, required: str, bad: Callable[[str], UnsupportedModel], max_size: int | None
) -> dict[str, FileEntry]:
    """A manifest's ``files``: safe names, a sha256 and a positive size each, under the cap."""
    if not isinstance(raw, dict) or required not in raw:
        raise bad(f"does not list {required}")
    files = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not _FILE_NAME.match(name) or ".." in name:
            raise bad(f"lists an invalid file name {name!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise bad(f"has no valid sha256 for {name}")
        size = entry.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise bad(f"has no valid size for {name}")
        if max_size is not None and size > max_size:
            raise bad(f"lists {name} at {size} bytes, above max_model_size ({max_size})")
        files[name] = FileEntry(sha256=entry["sha256"], size=size)
    return files
