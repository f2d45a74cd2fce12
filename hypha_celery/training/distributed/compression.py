"""Compressed pseudo-gradients: what an inner task sends in fewer bytes, and what the outer step reads back, checked.

A DiLoCo job names its ``compression`` (:data:`COMPRESSIONS`); the delta file stays safetensors and its
metadata names the encoding (``encoding``), so the outer step decodes exactly what was sent:

* ``none``: float tensors as :func:`.deltas.pseudo_gradient` writes them (4 bytes a value).
* ``bf16``: each tensor in bfloat16 (2 bytes a value).
* ``int8``: per block of :data:`INT8_BLOCK` values (the tensor flattened, the last block shorter), a float32 scale
  ``max|x| / 127`` and the values ``round(x / scale)`` in int8; stored as ``<name>`` (int8, the base's shape) and
  ``<name>::scale`` (float32, one per block): 1 + 4/256 bytes a value, about 0.254 of float32. Per block rather than
  per tensor: one outlying value then coarsens 256 values, not a whole embedding matrix.

Error feedback (``error_feedback``, on by default): what quantization dropped from a worker's delta is kept on that
worker (:class:`Residuals`, under its store, one file per job) and added to its next delta of the job, so nothing
is lost for good, only delayed (arXiv 1901.09847; INTELLECT-1 does the same). The residual files are bounded
(:data:`MAX_JOBS` jobs, the least recently used dropped), expire after :data:`RESIDUAL_TTL_S` untouched, and the
job's last round removes its own.

Every decoder checks what it reads before it is used (:func:`decoded`): the encoding is one of these, the
tensor names are the base's (with one ``::scale`` each for int8), each dtype is the encoding's, each shape the
base's (a scale: one per block), and every scale finite and above 0: a hostile worker's file is refused
(``DeltaRejected``) whatever it holds. Its values (finite, norm bounds) are checked once decoded, by the caller.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypha_celery.errors import DeltaRejected, UnsupportedModel
from hypha_celery.training.distributed.weights import read_tensor

if TYPE_CHECKING:
    import numpy as np

__all__ = ["COMPRESSIONS", "INT8_BLOCK", "MAX_JOBS", "RESIDUAL_TTL_S", "Residuals", "decoded", "encode",
           "encoding_name", "write_delta"]

COMPRESSIONS = ("none", "bf16", "int8")
INT8_BLOCK = 256
SCALE = "::scale"
MAX_JOBS = 8
RESIDUAL_TTL_S = 24 * 3600.0
RESIDUALS = ".diloco-residuals"
_FLOATS = ("float16", "bfloat16", "float32", "float64")
_TINY = 1.1754944e-38  # float32's smallest normal: a scale never underflows to 0


def encoding_name(compression: str) -> str:
    """The ``encoding`` metadata a delta compressed so carries (``int8-block256``: the block size is in the name)."""
    if compression == "int8":
        return f"int8-block{INT8_BLOCK}"
    if compression in COMPRESSIONS:
        return compression
    raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")


def _int8_block(encoding: str) -> int | None:
    """The block size an ``int8-block<B>`` encoding names (16 to 2**20), else None."""
    prefix = "int8-block"
    if not encoding.startswith(prefix) or not encoding[len(prefix):].isdigit():
        return None
    block = int(encoding[len(prefix):])
    return block if 16 <= block <= 2**20 else None


def quantize_int8(tensor: np.ndarray, block: int = INT8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``tensor`` as int8 values (its shape) and one float32 scale per block of its flattened values."""
    import numpy as np

    flat = tensor.astype(np.float32).ravel()
    blocks = max(1, math.ceil(flat.size / block))
    padded = np.zeros(blocks * block, dtype=np.float32)
    padded[:flat.size] = flat
    rows = padded.reshape(blocks, block)
    scales = np.abs(rows).max(axis=1) / 127.0
    scales = np.where(scales > 0, np.maximum(scales, _TINY), 1.0).astype(np.float32)  # a zero block: scale 1
    values = np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8)
    return values.ravel()[:flat.size].reshape(tensor.shape), scales


def dequantize_int8(values: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """The float32 tensor ``values`` x their block's scale (the shapes checked by the caller)."""
    import numpy as np

    flat = values.astype(np.float32).ravel()
    return (flat * np.repeat(scales.astype(np.float32), block)[:flat.size]).reshape(values.shape)


def encode(delta: Mapping[str, np.ndarray], compression: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The tensors to store for ``delta`` (float32) under ``compression``, and what they decode to (for the
    residual: ``delta - decoded`` is what the encoding dropped)."""
    import ml_dtypes
    import numpy as np

    if compression == "none":
        return dict(delta), dict(delta)
    if compression == "bf16":
        stored = {name: tensor.astype(ml_dtypes.bfloat16) for name, tensor in delta.items()}
        return stored, {name: tensor.astype(np.float32) for name, tensor in stored.items()}
    if compression != "int8":
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    clash = sorted(name for name in delta if name.endswith(SCALE) or f"{name}{SCALE}" in delta)
    if clash:
        raise UnsupportedModel(f"tensor {clash[0]!r} ends in {SCALE!r}, the int8 encoding's scale suffix: use "
                               "compression 'bf16' or 'none' for this model")
    out, back = {}, {}
    for name, tensor in delta.items():
        values, scales = quantize_int8(tensor)
        out[name], out[f"{name}{SCALE}"] = values, scales
        back[name] = dequantize_int8(values, scales, INT8_BLOCK)
    return out, back


def write_delta(delta: Mapping[str, np.ndarray], out: Path, metadata: Mapping[str, str], compression: str, *,
                residuals: Residuals | None = None, job: str = "", final: bool = False) -> dict[str, float]:
    """Encode ``delta`` (float32) into ``out`` under ``compression``, its ``encoding`` in the metadata.

    With ``residuals`` (error feedback) the job's residual is added first and what this encoding drops is kept
    for the job's next delta on this worker (none after the ``final`` round, nor for ``none``). Returns the
    figures the report carries: the L2 norms of the residual added and of the one kept."""
    import numpy as np
    from safetensors.numpy import save_file

    shapes = {name: tuple(tensor.shape) for name, tensor in delta.items()}
    carried = residuals.take(job, shapes) if residuals is not None and compression != "none" else None
    if carried is not None:
        delta = {name: (tensor + carried[name]).astype(np.float32) for name, tensor in delta.items()}
    stored, back = encode(delta, compression)
    save_file(stored, str(out), metadata={"format": "pt", **metadata, "encoding": encoding_name(compression)})
    kept = 0.0
    if residuals is not None and compression != "none":
        if final:
            residuals.drop(job)
        else:
            residual = {name: (tensor - back[name]).astype(np.float32) for name, tensor in delta.items()}
            kept = _norm(residual)
            residuals.put(job, residual)
    return {"residual_in": 0.0 if carried is None else _norm(carried), "residual_out": kept}


def _norm(tensors: Mapping[str, np.ndarray]) -> float:
    import numpy as np

    return math.sqrt(sum(float(np.dot(t.ravel(), t.ravel())) for t in (v.astype(np.float64) for v in tensors.values())))


@contextmanager
def decoded(path: Path, shapes: Mapping[str, tuple[int, ...]], what: str, order: Sequence[str] | None = None
            ) -> Iterator[Iterator[tuple[str, Any]]]:
    """The delta at ``path`` as ``(name, float tensor)`` pairs in name order (or ``order``: the base's, file by
    file), one tensor read at a time, once its encoding, names, dtypes, shapes and scales passed the checks
    (``DeltaRejected`` naming the first fault). The values are not checked here: the caller bounds them."""
    import ml_dtypes  # noqa: F401 - bfloat16 for safetensors.numpy
    from safetensors import safe_open

    try:
        handle_cm = safe_open(str(path), framework="numpy")
        handle = handle_cm.__enter__()
    except Exception as exc:  # safetensors raises its own error types for a garbled file
        raise DeltaRejected(f"{what}: not a safetensors file ({exc}); refused") from None
    try:
        encoding = str((handle.metadata() or {}).get("encoding", "none"))
        block = _int8_block(encoding)
        if encoding not in ("none", "bf16") and block is None:
            raise DeltaRejected(f"{what}: unknown encoding {encoding!r} (none, bf16, int8-block<B>); refused")
        names = set(handle.keys())
        wanted = set(shapes) | ({f"{name}{SCALE}" for name in shapes} if block is not None else set())
        if names != wanted:
            differ = sorted(names ^ wanted)
            raise DeltaRejected(f"{what}: its tensors are not the base's under encoding {encoding} (e.g. "
                                f"{differ[0]}); refused")
        yield _tensors(handle, shapes, encoding, block, what, sorted(shapes) if order is None else order)
    finally:
        handle_cm.__exit__(None, None, None)


def _tensors(handle: Any, shapes: Mapping[str, tuple[int, ...]], encoding: str, block: int | None,
             what: str, order: Sequence[str]) -> Iterator[tuple[str, Any]]:
    import numpy as np

    for name in order:
        try:
            tensor = read_tensor(handle, name)
            scales = read_tensor(handle, f"{name}{SCALE}") if block is not None else None
        except MemoryError:
            raise  # the executor's memory cap, not the delta's fault
        except Exception as exc:  # a dtype numpy lacks, a truncated file: safetensors' own error types
            raise DeltaRejected(f"{what}: tensor {name} is unreadable ({exc}); refused") from None
        dtype = str(tensor.dtype)
        allowed = {"none": _FLOATS, "bf16": ("bfloat16",)}.get(encoding, ("int8",))
        if dtype not in allowed:
            raise DeltaRejected(f"{what}: tensor {name} is {dtype}; encoding {encoding} stores {'/'.join(allowed)}; "
                                "refused")
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise DeltaRejected(f"{what}: tensor {name} has shape {tuple(tensor.shape)}, the base "
                                f"{tuple(shapes[name])}; refused")
        if scales is None:
            yield name, tensor
            continue
        assert block is not None
        count = max(1, math.ceil(int(np.prod(shapes[name], dtype=np.int64)) / block))
        if str(scales.dtype) != "float32" or tuple(scales.shape) != (count,):
            raise DeltaRejected(f"{what}: tensor {name}'s scales are {scales.dtype} {tuple(scales.shape)}, not "
                                f"float32 ({count},); refused")
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise DeltaRejected(f"{what}: tensor {name} has a scale that is not finite and above 0; refused")
        yield name, dequantize_int8(tensor, scales, block)


class Residuals:
    """A worker's error-feedback residuals, one safetensors file per job under ``root`` (its own disk).

    ``take`` moves a job's residual out of the folder before it is used (two inner tasks of one job on this worker
    never both add it); ``put`` writes the new one (added to any written meanwhile) and drops files untouched for
    :data:`RESIDUAL_TTL_S` and, past :data:`MAX_JOBS`, the least recently written."""

    def __init__(self, root: Path, *, max_jobs: int = MAX_JOBS, ttl_s: float = RESIDUAL_TTL_S) -> None:
        self.root = Path(root)
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s

    @classmethod
    def under(cls, store_root: Path) -> Residuals:
        return cls(Path(store_root) / RESIDUALS)

    def path(self, job: str) -> Path:
        return self.root / f"{job}.safetensors"

    def take(self, job: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
        """The job's residual (removed from the folder), or None when there is none or it does not fit ``shapes``."""
        from safetensors.numpy import load_file

        taken = self.root / f".{job}.{uuid.uuid4().hex}.taken"
        try:
            os.replace(self.path(job), taken)
        except FileNotFoundError:
            return None
        try:
            tensors = load_file(str(taken))
        except Exception:  # a file cut short by a crash: the residual is lost, not the delta
            return None
        finally:
            taken.unlink(missing_ok=True)
        if tensors.keys() != shapes.keys() or any(tuple(t.shape) != tuple(shapes[n]) for n, t in tensors.items()):
            return None
        return tensors

    def put(self, job: str, residual: Mapping[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        shapes = {name: tuple(tensor.shape) for name, tensor in residual.items()}
        meanwhile = self.take(job, shapes)
        total = dict(residual) if meanwhile is None else {n: t + meanwhile[n] for n, t in residual.items()}
        partial = self.root / f".{job}.{uuid.uuid4().hex}.partial"
        save_file(total, str(partial))
        os.replace(partial, self.path(job))
        self.sweep()

    def drop(self, job: str) -> None:
        """The job ended: its residual goes."""
        self.path(job).unlink(missing_ok=True)

    def sweep(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        files = []
        for path in self.root.glob("*.safetensors"):
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime > self.ttl_s:
                path.unlink(missing_ok=True)
            else:
                files.append((mtime, path))
        for _, path in sorted(files, reverse=True)[self.max_jobs:]:
            path.unlink(missing_ok=True)
        for stale in self.root.glob(".*.partial"):  # a write a crash cut short
            try:
                if now - stale.stat().st_mtime > 3600:
                    stale.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
