"""A checkpoint's float tensors, one safetensors file or many, read one tensor at a time.

DiLoCo's arithmetic (:mod:`.deltas`, :mod:`.apply`) reads a base model, its deltas and its momentum
tensor by tensor, so the outer step's memory is one tensor of each, not the whole model, and writes the
next version file by file in the base's own layout: ``model.safetensors``, or
``model.safetensors.index.json`` and the shards it names (``model-00001-of-00002.safetensors``), or a
LoRA adapter's ``adapter_model.safetensors``.

An index is read as a stranger's: at most :data:`MAX_INDEX` bytes of JSON whose ``weight_map`` maps each
tensor to a shard file that the entry lists (a plain shard name: never a path outside the folder), and
each shard holds exactly the tensors the index maps to it, each a float dtype. Anything else is refused
(``UnsupportedModel`` naming the fault) before a tensor is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.manifest import ADAPTER_WEIGHTS, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, is_weights_shard

if TYPE_CHECKING:
    import numpy as np

    from hypha_celery.models.store import Entry

__all__ = ["FLOATS", "MAX_INDEX", "Weights", "read_tensor", "weight_files"]

FLOATS = ("float16", "bfloat16", "float32", "float64")
MAX_INDEX = 16 * 2**20


def weight_files(entry: Entry) -> list[str]:
    """The entry's weight files by name: an adapter's one file, ``model.safetensors``, or the index's shards."""
    files = entry.manifest.files
    if entry.manifest.adapter_of is not None:
        return [ADAPTER_WEIGHTS]
    if SAFETENSORS_INDEX in files:
        return sorted({shard for shard in _weight_map(entry.file(SAFETENSORS_INDEX), files, entry.id).values()})
    if SAFETENSORS_SINGLE in files:
        return [SAFETENSORS_SINGLE]
    raise UnsupportedModel(f"model {entry.id!r}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {ADAPTER_WEIGHTS}")


def read_tensor(handle: Any, name: str) -> np.ndarray:
    """``handle.get_tensor(name)`` (a ``safe_open`` handle), a failed allocation raised as ``MemoryError``.

    Under the executor's ``RLIMIT_AS`` the array safetensors allocates for a tensor can fail; pyo3 then prints the
    ``MemoryError`` and panics with "PyObject pointer is null" (a ``PanicException``, not an ``Exception``), which
    would reach the worker as an unnamed failure. Raised as ``MemoryError`` it is ``MemoryLimitExceeded`` there.
    """
    try:
        return handle.get_tensor(name)
    except BaseException as exc:
        if type(exc).__name__ == "PanicException" and "pointer is null" in str(exc):
            raise MemoryError(f"tensor {name}: the array could not be allocated ({exc})") from None
        raise


def _weight_map(path: Path, files: Mapping[str, Any] | list[str], what: str) -> dict[str, str]:
    """The index's ``weight_map``, each shard a plain shard name listed in ``files`` (``UnsupportedModel``)."""
    try:
        if path.stat().st_size > MAX_INDEX:
            raise UnsupportedModel(f"{what}: {SAFETENSORS_INDEX} is larger than {MAX_INDEX} bytes")
        index = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise UnsupportedModel(f"{what}: {SAFETENSORS_INDEX} is unreadable ({type(exc).__name__})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UnsupportedModel(f"{what}: {SAFETENSORS_INDEX} has no weight_map")
    for tensor, shard in weight_map.items():
        if not is_weights_shard(shard) or shard not in files:
            raise UnsupportedModel(f"{what}: {SAFETENSORS_INDEX} maps {tensor!r} to {shard!r}, not a shard file of "
                                   "this model; refused")
    return dict(weight_map)


@dataclass
class Weights:
    """A checkpoint's tensors by file (in file order, then name order), each file opened once, when first read.

    ``open`` checks the layout and every header; :meth:`tensor` reads one tensor (numpy, its stored dtype).
    Use it as a context manager: the files are closed on exit.
    """

    directory: Path
    what: str
    files: dict[str, list[str]]  # file name -> its tensors, sorted
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    _where: dict[str, str] = field(default_factory=dict)
    _handles: dict[str, Any] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack)

    @classmethod
    def of(cls, entry: Entry) -> Weights:
        """The stored ``entry``'s weights (a model's, sharded or not, or an adapter's)."""
        names = weight_files(entry)
        folder = entry.file(names[0]).parent
        weight_map = _weight_map(entry.file(SAFETENSORS_INDEX), entry.manifest.files, f"model {entry.id!r}") \
            if SAFETENSORS_INDEX in entry.manifest.files and entry.manifest.adapter_of is None else None
        return cls.read(folder, names, f"model {entry.id!r}", weight_map)

    @classmethod
    def read(cls, folder: Path, names: list[str], what: str, weight_map: Mapping[str, str] | None = None) -> Weights:
        """The files ``names`` in ``folder``; with ``weight_map`` each must hold exactly the tensors it maps there."""
        from safetensors import safe_open

        files: dict[str, list[str]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        for name in names:
            try:
                with safe_open(str(folder / name), framework="numpy") as handle:
                    tensors = sorted(handle.keys())
                    for tensor in tensors:
                        sliced = handle.get_slice(tensor)
                        shapes[tensor], dtypes[tensor] = tuple(sliced.get_shape()), _dtype(sliced.get_dtype())
            except Exception as exc:  # safetensors raises its own error types for a garbled file
                raise UnsupportedModel(f"{what}: {name} is not a readable safetensors file ({exc})") from None
            clash = sorted(set(tensors) & {t for listed in files.values() for t in listed})
            if clash:
                raise UnsupportedModel(f"{what}: tensor {clash[0]!r} is in two weight files; refused")
            files[name] = tensors
        if weight_map is not None:
            for name, tensors in files.items():
                mapped = {tensor for tensor, shard in weight_map.items() if shard == name}
                if mapped != set(tensors):
                    differ = sorted(mapped ^ set(tensors))
                    raise UnsupportedModel(f"{what}: {name} does not hold exactly the tensors {SAFETENSORS_INDEX} "
                                           f"maps to it (e.g. {differ[0]!r}); refused")
        for tensor, dtype in dtypes.items():
            if dtype not in FLOATS:
                raise UnsupportedModel(f"{what}: tensor {tensor} is {dtype}; DiLoCo reads "
                                       f"{'/'.join(FLOATS)} tensors only")
        weights = cls(directory=folder, what=what, files=files, shapes=shapes, dtypes=dtypes)
        weights._where = {tensor: name for name, tensors in files.items() for tensor in tensors}
        return weights

    def __enter__(self) -> Weights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def names(self) -> Iterator[str]:
        """Every tensor, file by file."""
        for tensors in self.files.values():
            yield from tensors

    def tensor(self, name: str) -> np.ndarray:
        """One tensor, as stored (its file opened on first use)."""
        import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors.numpy then reads
        from safetensors import safe_open

        file = self._where[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = self._stack.enter_context(safe_open(str(self.directory / file),
                                                                               framework="numpy"))
        return read_tensor(handle, name)

    def norm(self) -> float:
        """The L2 norm of every tensor together (float64), read one tensor at a time."""
        import math

        import numpy as np

        squares = 0.0
        for name in self.names():
            wide = self.tensor(name).astype(np.float64).ravel()
            squares += float(np.dot(wide, wide))
        return math.sqrt(squares)


def _dtype(safetensors_dtype: str) -> str:
    """safetensors' dtype name (``F32``, ``BF16``) as numpy's (``float32``, ``bfloat16``); others as they are."""
    return {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}.get(safetensors_dtype,
                                                                                         safetensors_dtype)
