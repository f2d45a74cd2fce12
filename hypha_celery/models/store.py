"""The model store: one directory per model under ``model_dir``, verified before use.

Layout::

    <model_dir>/<model_id>/manifest.json        what the model is, and each file's sha256 + size
    <model_dir>/<model_id>/weights.safetensors  a built-in model's weights (no pickle: loading runs no code)
    <model_dir>/<model_id>/config.json, model.safetensors, tokenizer.json, ...
                                                a transformers model's allow-listed files (``add("transformers", ...)``)
    <model_dir>/<model_id>/model.onnx           an ONNX model's one file, its graph checked (``add("onnx", ...)``)
    <model_dir>/<model_id>/adapter_config.json, adapter_model.safetensors
                                                a LoRA adapter trained by ``hypha.train`` (``add(..., base=)``):
                                                its manifest names the base model (``adapter_of``)
    <model_dir>/<model_id>/.verified.json       the stamp: each file's size, mtime, ctime, inode and
                                                sha256 when it was last hashed and matched
    <model_dir>/<model_id>/.produced.json       a trained model's record: the task id that saved it and
                                                what training reported (``add(produced_by=...)``), so a
                                                copy of that task answers from it (``produced_by``)

    <model_dir>/<dataset_id>/dataset.json       a training data set: rows, and data.json's sha256 + size
    <model_dir>/<dataset_id>/data.json          {"inputs": [...], "targets": [...]} (built-in models), or
                                                {"texts": [...]} / {"texts": [...], "labels": [...]} (``save_texts``)

    <model_dir>/.checkpoints/<task id>/         a training task's checkpoints (:mod:`hypha_celery.training.checkpoints.local`)

    <model_dir>/.incoming-<id>-XXXXXXXX/        a model being assembled (``staging``: in <model_dir>/.incoming/
                                                for a sandboxed training executor, which may write only there);
                                                removed on any failure, and a killed process's is swept when a store
                                                opens (``from_config``) or stages, once its model's lock is free

Data sets live beside models and travel by the same sources and checks, so
``hypha.train`` can take ``data={"ref": "<dataset id>"}`` instead of inline rows.

A model id is ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`` without ``..``: one path
component, so no id can name a file outside ``model_dir``. A model directory
appears by one ``rename`` after every file was verified, so a reader sees a
whole model or none; the manifest is what marks it complete. The manifest
types, the file names and the id rule are :mod:`hypha_celery.manifest`.

A model is used through its handle: :meth:`ModelStore.open` fetches it if missing, reads and hashes its
manifest once and verifies its files, and returns an :class:`Entry` (manifest, folder, the manifest's
sha256) that is passed down to a runtime, a fine-tune, an adapter's import; only this module spells
paths inside an entry (``tests/unit/test_store_handle.py`` holds every other module to it). A new entry
is made in one :meth:`ModelStore.transaction`: the id's lock, the one "already exists" check
(:meth:`ModelStore.refuse_taken`: ids are immutable), a staging folder, the install.

How a model enters the store, and what its manifest's own fields and files must say, is its format's
(:mod:`hypha_celery.formats`): :meth:`ModelStore.add` and a fetch look the format up by the manifest's
``runtime`` in one table (:mod:`hypha_celery.formats.registry`) and hand it the store as its
:class:`~hypha_celery.formats.base.Target` (a transaction to fill; the base an adapter names, opened).

What an import reads from a folder stays inside it: links and other non-regular files are refused and
files are opened without following links (:mod:`hypha_celery.formats.safe_files`); ``max_model_size`` is checked against the
files' sizes before a staging folder is made, and again while they are copied.

Every file's sha256 is checked once, when it is installed, and again only when
its stamp no longer matches (it was replaced, rewritten or touched): a cold
load of a 16 GB model stats its files instead of re-reading them. A file
whose hash no longer matches the manifest is refused.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.base import Imported
from hypha_celery.formats.registry import format_of, read_manifest
from hypha_celery.formats.safe_files import sha256_file
from hypha_celery.manifest import (
    DATA,
    DATASET_MANIFEST,
    MODEL_MANIFEST,
    DatasetManifest,
    FileEntry,
    Manifest,
    is_model_id,
    validate_model_id,
)
from hypha_celery.models import staging as staging_dirs
from hypha_celery.models.sources import fetch_manifest, fetch_model

if TYPE_CHECKING:
    from hypha_celery.config import ModelsConfig, ModelSource

__all__ = ["PRODUCED", "STAMP", "Entry", "ModelStore", "Transaction"]

STAMP = ".verified.json"
PRODUCED = ".produced.json"
DEFAULT_MAX_MODEL_SIZE = 20 * 10**9  # keep equal to config.schema's max_model_size default


@dataclass(frozen=True)
class Entry:
    """One stored model, verified once by :meth:`ModelStore.open` and handed down instead of read again.

    ``sha256`` is the digest of the very ``manifest.json`` bytes ``manifest`` was parsed from: what a
    scheduler pins a model by and an adapter names its base by. Its files are reached through
    :meth:`file` and :meth:`files`: only the store spells paths inside an entry.
    """

    manifest: Manifest
    folder: Path
    sha256: str

    @property
    def id(self) -> str:
        return self.manifest.id

    def file(self, name: str) -> Path:
        """The verified file ``name`` (one the manifest lists)."""
        if name not in self.manifest.files:
            raise UnsupportedModel(f"model {self.id!r} has no {name} in its manifest")
        return self.folder / name

    def files(self) -> dict[str, Path]:
        """Every listed file by its name in the manifest."""
        return {name: self.folder / name for name in self.manifest.files}

    @property
    def manifest_file(self) -> Path:
        """The ``manifest.json`` whose bytes hash to ``sha256`` (for an upload of the whole entry)."""
        return self.folder / MODEL_MANIFEST


class Transaction:
    """A new entry being assembled under its id's lock: ``folder`` is its staging folder, :meth:`install` ends it."""

    def __init__(self, store: ModelStore, model_id: str, folder: Path) -> None:
        self.store, self.model_id, self.folder = store, model_id, folder

    def install(self, manifest: Manifest, produced_by: dict[str, Any] | None = None) -> None:
        """Check the manifest as a reader will, stamp the staged files, write the manifest, rename into place."""
        if manifest.id != self.model_id:
            raise UnsupportedModel(f"a transaction for {self.model_id!r} cannot install {manifest.id!r}")
        self.store._install_model(self.folder, manifest, produced_by)


class ModelStore:
    """Models under ``root``; missing ones are fetched from ``sources`` in order."""

    def __init__(
        self, root: str | os.PathLike[str], sources: Sequence[ModelSource] = (), max_model_size: int = DEFAULT_MAX_MODEL_SIZE,
        staging: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.sources = list(sources)
        self.max_model_size = max_model_size
        # Where new models are assembled before their rename into root; a sandboxed training
        # executor may write only below root/.incoming (hypha_celery.executor.landlock).
        self.staging = Path(staging) if staging is not None else self.root

    @classmethod
    def from_config(cls, models: ModelsConfig, root: str | os.PathLike[str] | None = None,
                    sources: Sequence[ModelSource] = (), staging: str | os.PathLike[str] | None = None) -> ModelStore:
        """The store ``[worker.models]`` describes, or the one at ``root`` (``--store DIR``): either way capped at
        the configured ``max_model_size``; what dead imports left in its staging folders is removed."""
        store = cls(models.model_dir if root is None else root, sources, models.max_model_size, staging)
        store.sweep_staging()
        return store

    def path(self, model_id: str) -> Path:
        return self.root / validate_model_id(model_id)

    def list(self) -> builtins.list[str]:
        """Ids of the models present and complete in the store."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name for entry in self.root.iterdir()
            if is_model_id(entry.name) and (entry / MODEL_MANIFEST).is_file()
        )

    def has(self, model_id: str, *, dataset: bool = False) -> bool:
        """Whether the model (or data set) is here, complete."""
        return (self.path(model_id) / (DATASET_MANIFEST if dataset else MODEL_MANIFEST)).is_file()

    def taken(self, model_id: str) -> bool:
        """Whether ``model_id`` names anything stored, a model or a data set: ids are immutable, so it is not free."""
        return self.has(model_id) or self.has(model_id, dataset=True)

    def refuse_taken(self, model_id: str, error: type[Exception] = UnsupportedModel, what: str = "") -> None:
        """The one "already exists" check: raise ``error`` when ``model_id`` is taken (``what`` names the argument)."""
        if self.taken(model_id):
            raise error(f"{what}{model_id!r} already exists in the store; model ids are immutable, pick another")

    def open(self, model_id: str) -> Entry:
        """The model, fetched if missing, its manifest read and hashed once and every listed file verified."""
        self.ensure(model_id)
        raw = self._manifest_bytes(model_id)
        manifest = self._parse_manifest(raw, model_id)
        self._verify_dir(manifest, self.path(model_id))
        return Entry(manifest, self.path(model_id), hashlib.sha256(raw).hexdigest())

    def read_json(self, model_id: str, name: str) -> Any:
        """A small JSON file of a present model (one its manifest lists), read unverified: what validation and
        sizing look at before a lease (the run verifies); None when the model or the file is absent or unreadable."""
        if not self.has(model_id):
            return None
        try:
            return json.loads((self.path(model_id) / name).read_text())
        except (OSError, ValueError):
            return None

    def manifest(self, model_id: str) -> Manifest:
        """The local manifest, fetching the model first if the store lacks it."""
        self.ensure(model_id)
        return self._read_manifest(model_id)

    def peek(self, model_id: str) -> Manifest:
        """The manifest, local or read from the first source that has it, without fetching the model.

        Sizing reads it before admission; the model itself is fetched (and
        verified against this same kind of manifest) only under a lease.
        """
        if self.has(model_id):
            return self._read_manifest(model_id)
        if not self.sources:
            raise UnsupportedModel(f"model {model_id!r} is not in the store and no sources are configured")
        errors = []
        for source in self.sources:
            try:
                return fetch_manifest(source, model_id, self.max_model_size)
            except UnsupportedModel as exc:
                errors.append(f"{source.type}: {exc}")
        raise UnsupportedModel(f"model {model_id!r} is not in the store ({self.root}) and no source has it (check "
                               "the id: `hypha-celery models list`): " + "; ".join(errors))

    def _read_manifest(self, model_id: str) -> Manifest:
        return self._parse_manifest(self._manifest_bytes(model_id), model_id)

    def _manifest_bytes(self, model_id: str) -> bytes:
        try:
            return (self.path(model_id) / MODEL_MANIFEST).read_bytes()
        except FileNotFoundError:
            raise UnsupportedModel(f"model {model_id!r} is not in the store") from None
        except OSError as exc:
            raise UnsupportedModel(f"model {model_id!r}: unreadable manifest ({exc})") from None

    def _parse_manifest(self, raw: bytes, model_id: str) -> Manifest:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UnsupportedModel(f"model {model_id!r}: unreadable manifest ({exc})") from None
        return read_manifest(data, model_id, self.max_model_size)

    def ensure(self, model_id: str, *, dataset: bool = False) -> None:
        """Make ``model_id`` (or a data set) present locally: fetched and verified once, even across processes."""
        what = "data set" if dataset else "model"
        marker = DATASET_MANIFEST if dataset else MODEL_MANIFEST
        if self.has(model_id, dataset=dataset):
            return
        if not self.sources:
            raise UnsupportedModel(f"{what} {model_id!r} is not in the store and no sources are configured")
        with self._lock(model_id):
            if self.has(model_id, dataset=dataset):
                return
            parse = DatasetManifest.from_json if dataset else read_manifest
            errors = []
            for source in self.sources:
                try:
                    with self._staging(model_id) as staging:
                        manifest = fetch_model(source, model_id, staging, self.max_model_size, parse, marker)
                        self._verify_dir(manifest, staging)
                        if isinstance(manifest, Manifest):  # its files read as an import would read them
                            format_of(manifest.runtime).check_fetched(staging, manifest)
                        self._install(model_id, staging)
                    return
                except UnsupportedModel as exc:
                    errors.append(f"{source.type}: {exc}")
            check = "check the id" + ("" if dataset else ": `hypha-celery models list`")
            raise UnsupportedModel(f"{what} {model_id!r} is not in the store ({self.root}) and could not be fetched "
                                   f"({check}): " + "; ".join(errors))

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
        """Store a training data set of rows (atomically; an existing id is refused)."""
        if not isinstance(inputs, list) or not isinstance(targets, list) or len(inputs) != len(targets) or not inputs:
            raise UnsupportedModel("a data set needs equally long, non-empty lists of inputs and targets")
        return self._save_data(dataset_id, {"inputs": inputs, "targets": targets}, len(inputs))

    def save_texts(self, dataset_id: str, texts: builtins.list[Any], labels: builtins.list[Any] | None = None
                   ) -> DatasetManifest:
        """Store a text data set for a transformers model: ``texts``, and ``labels`` for a classifier."""
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) and text for text in texts):
            raise UnsupportedModel("a text data set needs a non-empty list of non-empty strings")
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(texts)):
            raise UnsupportedModel("a text data set's labels must be a list with one label per text")
        data: dict[str, Any] = {"texts": texts} if labels is None else {"texts": texts, "labels": labels}
        return self._save_data(dataset_id, data, len(texts))

    def _save_data(self, dataset_id: str, content: dict[str, Any], rows: int) -> DatasetManifest:
        with self.transaction(dataset_id) as new:
            data = new.folder / DATA
            data.write_text(json.dumps(content, separators=(",", ":")))
            manifest = DatasetManifest(id=dataset_id, rows=rows,
                                       files={DATA: FileEntry(sha256=sha256_file(data), size=data.stat().st_size)})
            self._write_stamp(new.folder, {DATA: self._stamp(data, manifest.files[DATA].sha256)})
            _write_json(new.folder / DATASET_MANIFEST, manifest.to_json())
            self._install(dataset_id, new.folder)
        return manifest

    def remove(self, model_id: str) -> None:
        """Delete a stored entry (DiLoCo's per-round trained models, once their delta is uploaded)."""
        with self._lock(model_id):
            shutil.rmtree(self.path(model_id), ignore_errors=True)

    def produced_by(self, model_id: str) -> dict[str, Any] | None:
        """The record ``save(produced_by=...)`` stored with a model; None when there is none or it is unreadable."""
        try:
            data = json.loads((self.path(model_id) / PRODUCED).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def manifest_sha256(self, model_id: str) -> str:
        """The sha256 of the stored ``manifest.json`` bytes: what a scheduler can pin a model by (the worker's check
        before a lease; a run has it from :meth:`open`)."""
        self.ensure(model_id)
        return sha256_file(self.path(model_id) / MODEL_MANIFEST)

    def add(self, runtime: str, source: Any, model_id: str, **options: Any) -> Imported:
        """Store ``source`` as ``model_id`` in the format whose models ``runtime`` loads (an existing id is refused).

        ``source`` and ``options`` are the format's (:data:`hypha_celery.formats.registry.FORMATS`):
        ``"transformers"`` takes a Hugging Face folder (``task``, ``parent``, ``produced_by``; with ``base``, a
        LoRA adapter of that stored model), ``"onnx"`` a ``.onnx`` file or a folder holding one, ``"builtin"``
        a module (``architecture``, ``config``, ``input_shape``, ``task``, ``batchable``, ``parent``,
        ``produced_by``). ``produced_by`` (the saving task's id and what it reported) is written with the model,
        in the same ``rename``: whoever finds the model finds the record (:meth:`produced_by`).
        """
        validate_model_id(model_id)
        return format_of(runtime).store(self, source, model_id, **options)

    @contextmanager
    def transaction(self, model_id: str) -> Iterator[Transaction]:
        """A new entry ``model_id``: its lock held, the id refused when taken (:meth:`refuse_taken`), a fresh staging
        folder removed on any failure; the caller's :meth:`Transaction.install` puts it in place."""
        validate_model_id(model_id)
        with self._lock(model_id):
            self.refuse_taken(model_id)
            with self._staging(model_id) as staging:
                yield Transaction(self, model_id, staging)

    def _install_model(self, staging: Path, manifest: Manifest, produced_by: dict[str, Any] | None) -> None:
        read_manifest(manifest.to_json(), manifest.id, self.max_model_size)
        self._write_stamp(staging, {name: self._stamp(staging / name, entry.sha256)
                                    for name, entry in manifest.files.items()})
        if produced_by is not None:
            _write_json(staging / PRODUCED, produced_by)
        _write_json(staging / MODEL_MANIFEST, manifest.to_json())
        self._install(manifest.id, staging)

    def _verify_dir(self, manifest: Manifest | DatasetManifest, folder: Path) -> None:
        """Check each listed file against the manifest: by its stamp when unchanged, else by its sha256."""
        stamps = self._read_stamp(folder)
        changed = False
        for name, entry in manifest.files.items():
            path = folder / name
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise UnsupportedModel(f"model {manifest.id!r}: {name} is missing") from None
            if stat.st_size != entry.size:
                raise UnsupportedModel(
                    f"model {manifest.id!r}: {name} is {stat.st_size} bytes, manifest says {entry.size} (truncated or altered)"
                )
            if stamps.get(name) == _stamp_of(stat, entry.sha256):
                continue
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise UnsupportedModel(
                    f"model {manifest.id!r}: {name} sha256 {actual[:12]}... does not match the manifest's "
                    f"{entry.sha256[:12]}... (tampered or corrupt); refusing to load it"
                )
            stamps[name] = _stamp_of(stat, actual)
            changed = True
        if changed:
            self._write_stamp(folder, stamps)

    @staticmethod
    def _stamp(path: Path, sha256: str) -> dict[str, Any]:
        return _stamp_of(path.stat(), sha256)

    @staticmethod
    def _read_stamp(folder: Path) -> dict[str, Any]:
        """The folder's stamp; a missing or garbled one is empty (everything is hashed again)."""
        try:
            data = json.loads((folder / STAMP).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _write_stamp(folder: Path, stamps: dict[str, Any]) -> None:
        """Replace the stamp atomically; a read-only store just hashes again next time."""
        try:
            descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".verified-", suffix=".tmp")
        except OSError:
            return
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(stamps, handle, sort_keys=True)
            os.replace(temporary, folder / STAMP)
        except OSError:
            Path(temporary).unlink(missing_ok=True)

    def sweep_staging(self, holding: str | None = None) -> None:
        """Remove what killed imports, fetches and saves left in the staging folders (:func:`.staging.sweep`)."""
        staging_dirs.sweep(self.root, self.staging, holding)

    def _lock(self, model_id: str) -> AbstractContextManager[None]:
        return staging_dirs.lock(self.root, model_id)

    def _staging(self, model_id: str) -> AbstractContextManager[Path]:
        """A fresh staging folder (the model's lock is held), removed on any failure; dead ones are swept first."""
        return staging_dirs.folder(self.root, self.staging, model_id)

    def _install(self, model_id: str, staging: Path) -> None:
        target = self.path(model_id)
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover (no manifest): we hold the lock
        os.rename(staging, target)


def _stamp_of(stat: os.stat_result, sha256: str) -> dict[str, Any]:
    """What must stay equal for a hashed file to count as unchanged.

    The ctime too: an in-place rewrite can put the old mtime back (touch -r,
    rsync --inplace), not the ctime; a rename of the model folder keeps both.
    """
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino, "sha256": sha256}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
