"""What a format is to the store: the shape every format module fills in, and the store's side of an import.

A format (:mod:`.builtin`, :mod:`.huggingface`, :mod:`.onnx`) owns everything that depends on how a
model's files are laid out: how it enters the store (:attr:`Format.store`), what its manifest's own
fields must say (:attr:`Format.manifest_fields`), and what a fetched copy's files must agree with
(:attr:`Format.check_fetched`). Each module ends with one :class:`Format` value, and the registry
(:mod:`.registry`) lists them by the manifest's ``runtime``: the store looks a format up there and
never branches on one. A new format is one module here and one line in the registry.

The store hands itself to an import as a :class:`Target` (a transaction: the model's lock, the id's
existence check, staging, the install),
so a format writes into the store without importing it: formats sit below ``hypha_celery/models/``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hypha_celery.manifest import Bad, Manifest

__all__ = ["Format", "Imported", "ManifestFields", "NewEntry", "StoredModel", "Target"]

# (the manifest as JSON, its common fields already checked, the error-maker, max_model_size) -> the format's fields
ManifestFields = Callable[[dict[str, Any], dict[str, Any], Bad, "int | None"], dict[str, Any]]


@dataclass(frozen=True)
class Imported:
    """What an import stored, and the files it left behind (present in the source, not needed)."""

    manifest: Manifest
    skipped: list[str]


class StoredModel(Protocol):
    """A stored model as the store hands it over verified (``models.store.Entry``): what an adapter's import reads."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def sha256(self) -> str:
        """The sha256 of its ``manifest.json`` bytes (an adapter pins its base by it)."""
        ...


class NewEntry(Protocol):
    """An entry being assembled (``models.store.Transaction``): its staging folder, and the install that ends it."""

    @property
    def folder(self) -> Path: ...

    def install(self, manifest: Manifest, produced_by: dict[str, Any] | None = None) -> None:
        """Check ``manifest`` as a reader will, stamp the staged files, write the manifest, rename into place."""
        ...


class Target(Protocol):
    """The store, as an import sees it: where a new entry is assembled and how it is installed."""

    @property
    def max_model_size(self) -> int: ...

    def transaction(self, model_id: str) -> AbstractContextManager[NewEntry]:
        """``model_id``'s lock, the id refused when taken, a fresh staging folder removed on failure."""
        ...

    def open(self, model_id: str) -> StoredModel:
        """A stored model, verified (an adapter reads its base's manifest and digest)."""
        ...


@dataclass(frozen=True)
class Format:
    """One way a model's files are laid out, and the runtime that loads it.

    ``runtime`` is the manifest's ``runtime`` value (the registry's key). ``store(target, source,
    model_id, **options)`` imports ``source`` (a folder, a file, a module: the format says) as
    ``model_id``. ``check_fetched(folder, manifest)`` refuses a fetched model whose files disagree
    with its manifest. ``shapeless``: its models take no per-sample input shape.
    """

    runtime: str
    manifest_fields: ManifestFields
    check_fetched: Callable[[Path, Manifest], None]
    store: Callable[..., Imported]
    shapeless: bool = False
