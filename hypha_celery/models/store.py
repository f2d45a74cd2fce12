"""The model store: one directory per model under ``model_dir``, verified before use.

Layout::

    <model_dir>/<model_id>/manifest.json        what the model is, and each file's sha256 + size
    <model_dir>/<model_id>/weights.safetensors  the weights (no pickle: loading runs no code)

    <model_dir>/<dataset_id>/dataset.json       a training data set: rows, and data.json's sha256 + size
    <model_dir>/<dataset_id>/data.json          {"inputs": [...], "targets": [...]}

Data sets live beside models and travel by the same sources and checks, so
``hypha.train`` can take ``data={"ref": "<dataset id>"}`` instead of inline rows.

A model id is ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`` without ``..``: one path
component, so no id can name a file outside ``model_dir``. A model directory
appears by one ``rename`` after every file was verified, so a reader sees a
whole model or none; the manifest is what marks it complete.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypha_celery.errors import UnsupportedModel

if TYPE_CHECKING:
    from torch import nn

    from hypha_celery.config import ModelSource

__all__ = ["FORMAT", "FileEntry", "Manifest", "ModelStore", "sha256_file", "validate_model_id"]

FORMAT = "hypha-model/1"
WEIGHTS = "weights.safetensors"
DATASET_FORMAT = "hypha-dataset/1"
DATASET_MANIFEST = "dataset.json"
DATA = "data.json"
# \Z, not $: "$" also matches before a trailing newline, and "mlp\n" is not a valid id.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_CHUNK = 1 << 20


def validate_model_id(model_id: object) -> str:
    """Return ``model_id`` if it is a well-formed id, else raise ``UnsupportedModel``."""
    if not isinstance(model_id, str) or not _MODEL_ID.match(model_id) or ".." in model_id:
        raise UnsupportedModel(
            f"invalid model id {model_id!r}: use letters, digits, '_', '-', '.' "
            "(one name, at most 128 characters, no '..' or '/')"
        )
    return model_id


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
        from hypha_celery.models.architectures import ARCHITECTURES

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


def _files(raw: Any, required: str, bad: Any, max_size: int | None) -> dict[str, FileEntry]:
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


class ModelStore:
    """Models under ``root``; missing ones are fetched from ``sources`` in order."""

    def __init__(
        self, root: str | os.PathLike[str], sources: Sequence[ModelSource] = (), max_model_size: int = 4 * 10**9
    ) -> None:
        self.root = Path(root)
        self.sources = list(sources)
        self.max_model_size = max_model_size
        self._verified: dict[Path, tuple[int, int, int, int]] = {}

    def path(self, model_id: str) -> Path:
        return self.root / validate_model_id(model_id)

    def list(self) -> builtins.list[str]:
        """Ids of the models present and complete in the store."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name for entry in self.root.iterdir()
            if _MODEL_ID.match(entry.name) and (entry / "manifest.json").is_file()
        )

    def has(self, model_id: str) -> bool:
        return (self.path(model_id) / "manifest.json").is_file()

    def manifest(self, model_id: str) -> Manifest:
        """The local manifest, fetching the model first if the store lacks it."""
        self.ensure(model_id)
        return self._read_manifest(model_id)

    def _read_manifest(self, model_id: str) -> Manifest:
        path = self.path(model_id) / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UnsupportedModel(f"model {model_id!r} is not in the store") from None
        except (OSError, ValueError) as exc:
            raise UnsupportedModel(f"model {model_id!r}: unreadable manifest ({exc})") from None
        return Manifest.from_json(data, model_id, self.max_model_size)

    def ensure(self, model_id: str, *, dataset: bool = False) -> None:
        """Make ``model_id`` (or a data set) present locally: fetched and verified once, even across processes."""
        what = "data set" if dataset else "model"
        marker = DATASET_MANIFEST if dataset else "manifest.json"
        if (self.path(model_id) / marker).is_file():
            return
        if not self.sources:
            raise UnsupportedModel(f"{what} {model_id!r} is not in the store and no sources are configured")
        with self._lock(model_id):
            if (self.path(model_id) / marker).is_file():
                return
            from hypha_celery.models.sources import fetch_model

            parse = DatasetManifest.from_json if dataset else Manifest.from_json
            errors = []
            for source in self.sources:
                try:
                    with self._staging(model_id) as staging:
                        manifest = fetch_model(source, model_id, staging, self.max_model_size, parse, marker)
                        self._verify_dir(manifest, staging)
                        self._install(model_id, staging)
                    return
                except UnsupportedModel as exc:
                    errors.append(f"{source.type}: {exc}")
            raise UnsupportedModel(f"{what} {model_id!r} could not be fetched: " + "; ".join(errors))

    def dataset(self, dataset_id: str) -> tuple[DatasetManifest, Path]:
        """A data set's manifest and the path of its verified ``data.json`` (fetched if missing)."""
        self.ensure(dataset_id, dataset=True)
        path = self.path(dataset_id) / DATASET_MANIFEST
        try:
            manifest = DatasetManifest.from_json(json.loads(path.read_text()), dataset_id, self.max_model_size)
        except (OSError, ValueError) as exc:
            raise UnsupportedModel(f"data set {dataset_id!r}: unreadable manifest ({exc})") from None
        self._verify_dir(manifest, self.path(dataset_id))
        return manifest, self.path(dataset_id) / DATA

    def save_dataset(self, dataset_id: str, inputs: builtins.list[Any], targets: builtins.list[Any]) -> DatasetManifest:
        """Store a training data set (atomically; an existing id is refused)."""
        validate_model_id(dataset_id)
        if self.path(dataset_id).exists():
            raise UnsupportedModel(f"{dataset_id!r} already exists in the store; ids are immutable")
        if not isinstance(inputs, list) or not isinstance(targets, list) or len(inputs) != len(targets) or not inputs:
            raise UnsupportedModel("a data set needs equally long, non-empty lists of inputs and targets")
        with self._lock(dataset_id), self._staging(dataset_id) as staging:
            data = staging / DATA
            data.write_text(json.dumps({"inputs": inputs, "targets": targets}, separators=(",", ":")))
            manifest = DatasetManifest(id=dataset_id, rows=len(inputs),
                                       files={DATA: FileEntry(sha256=sha256_file(data), size=data.stat().st_size)})
            _write_json(staging / DATASET_MANIFEST, manifest.to_json())
            self._install(dataset_id, staging)
        return manifest

    def verified_weights(self, model_id: str) -> tuple[Manifest, Path]:
        """The manifest and weights path, after checking every file's size and sha256."""
        manifest = self.manifest(model_id)
        self._verify_dir(manifest, self.path(model_id))
        return manifest, self.path(model_id) / WEIGHTS

    def save(
        self,
        model_id: str,
        module: nn.Module,
        *,
        architecture: str,
        config: dict[str, Any],
        input_shape: builtins.list[int],
        task: str = "classification",
        batchable: bool = True,
        parent: str | None = None,
    ) -> Manifest:
        """Store a module's weights as a new model (atomically; an existing id is refused)."""
        from safetensors.torch import save_file

        validate_model_id(model_id)
        if self.has(model_id):
            raise UnsupportedModel(f"model {model_id!r} already exists; model ids are immutable")
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in module.state_dict().items()}
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.") if state else "float32"
        with self._lock(model_id), self._staging(model_id) as staging:
            if self.has(model_id):  # again under the lock: _install would replace what a concurrent save just wrote
                raise UnsupportedModel(f"model {model_id!r} already exists; model ids are immutable")
            save_file(state, str(staging / WEIGHTS))
            weights = staging / WEIGHTS
            manifest = Manifest(
                id=model_id,
                architecture=architecture,
                config=dict(config),
                input_shape=list(input_shape),
                files={WEIGHTS: FileEntry(sha256=sha256_file(weights), size=weights.stat().st_size)},
                dtype=dtype,
                task=task,
                batchable=batchable,
                parent=parent,
            )
            _write_json(staging / "manifest.json", manifest.to_json())
            self._install(model_id, staging)
        return manifest

    def _verify_dir(self, manifest: Manifest | DatasetManifest, folder: Path) -> None:
        for name, entry in manifest.files.items():
            path = folder / name
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise UnsupportedModel(f"model {manifest.id!r}: {name} is missing") from None
            # ctime too: an in-place rewrite can put the old mtime back (touch -r, rsync --inplace), not the ctime
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
            if self._verified.get(path) == stamp:
                continue
            if stat.st_size != entry.size:
                raise UnsupportedModel(
                    f"model {manifest.id!r}: {name} is {stat.st_size} bytes, manifest says {entry.size} (truncated or altered)"
                )
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise UnsupportedModel(
                    f"model {manifest.id!r}: {name} sha256 {actual[:12]}... does not match the manifest's "
                    f"{entry.sha256[:12]}... (tampered or corrupt); refusing to load it"
                )
            self._verified[path] = stamp

    @contextmanager
    def _lock(self, model_id: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{model_id}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def _staging(self, model_id: str) -> Iterator[Path]:
        """A fresh staging folder (the model's lock is held: any older one is a dead process's)."""
        self.root.mkdir(parents=True, exist_ok=True)
        leftover = re.compile(rf"^\.incoming-{re.escape(model_id)}-[a-z0-9_]{{8}}\Z")
        for entry in self.root.iterdir():
            if leftover.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".incoming-{model_id}-", dir=self.root))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _install(self, model_id: str, staging: Path) -> None:
        target = self.path(model_id)
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover (no manifest): we hold the lock
        os.rename(staging, target)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
