"""Read a safetensors file's header with the standard library: what it holds, before anything loads it.

A safetensors file is a little-endian u64 ``N``, ``N`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [start, end]}}`` (plus an optional
``"__metadata__"`` table of strings), then the tensor data. The worker sizes a
model from this alone (no torch, no safetensors package), so every field is
checked the way the safetensors loader checks it: ``N`` capped at 100 MB (the
loader's own cap), dtypes known, ``end - start == numel * itemsize``, offsets
sorted and contiguous from 0, and ``8 + N + last_end`` equal to the file size.
Any violation is ``UnsupportedModel`` naming the file and the reason.

Not a format of its own in the registry: the weights container the built-in
and Hugging Face formats (and a LoRA adapter) share.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.safe_files import open_regular
from hypha_celery.manifest import is_weights_shard

__all__ = ["FLOAT_DTYPES", "ITEMSIZE", "MAX_HEADER", "Checkpoint", "read_checkpoint", "read_header"]

MAX_HEADER = 100_000_000  # the safetensors loader refuses larger headers too
MAX_INDEX = 16 * 2**20
# Bytes per element of each dtype safetensors writes with a whole number of bytes per element.
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "C64": 8,
}
# The floating dtypes a checkpoint's compute dtype can be, by their manifest names.
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class Checkpoint:
    """What one or more safetensors files hold: elements, bytes, and elements per dtype."""

    parameters: int = 0
    nbytes: int = 0
    elements: dict[str, int] = field(default_factory=dict)
    names: frozenset[str] = frozenset()

    @property
    def dtype(self) -> str | None:
        """The floating dtype holding most elements (the checkpoint dtype), None if none is floating."""
        floating = [(count, dtype) for dtype, count in self.elements.items() if dtype in FLOAT_DTYPES]
        return FLOAT_DTYPES[max(floating)[1]] if floating else None

    def __add__(self, other: Checkpoint) -> Checkpoint:
        return Checkpoint(self.parameters + other.parameters, self.nbytes + other.nbytes,
                          dict(Counter(self.elements) + Counter(other.elements)), self.names | other.names)


def read_header(path: Path) -> Checkpoint:
    """Parse and check ``path``'s header against the file; raise ``UnsupportedModel`` on any violation."""
    def bad(reason: str) -> UnsupportedModel:
        return UnsupportedModel(f"{path.name}: not a valid safetensors file: {reason}")

    try:
        with os.fdopen(open_regular(path.parent, path.name), "rb") as handle:  # a planted link is refused
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER:
                raise bad(f"header of {length} bytes, above the {MAX_HEADER}-byte cap")
            if 8 + length > size:
                raise bad(f"header of {length} bytes runs past the end of the {size}-byte file")
            raw = handle.read(length)
    except OSError as exc:
        raise UnsupportedModel(f"{path.name}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    spans = []
    elements: Counter[str] = Counter()
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ is not a table of strings")
            continue
        spans.append(_tensor(name, info, bad, elements))
    spans.sort()
    end = 0
    for start, stop, name in spans:
        if start != end:
            raise bad(f"tensor {name!r} starts at {start}, expected {end} (overlapping or a gap)")
        end = stop
    if 8 + length + end != size:
        raise bad(f"header and data make {8 + length + end} bytes, the file has {size}")
    return Checkpoint(sum(elements.values()), end, dict(elements), frozenset(name for _, _, name in spans))


def _tensor(name: str, info: Any, bad: Any, elements: Counter[str]) -> tuple[int, int, str]:
    """One header entry, checked: its (start, end, name)."""
    if not isinstance(info, dict):
        raise bad(f"tensor {name!r} is not a table")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    start, stop = offsets
    numel = math.prod(shape)
    if stop - start != numel * ITEMSIZE[dtype]:
        raise bad(f"tensor {name!r} spans {stop - start} bytes, its shape {shape} of {dtype} needs {numel * ITEMSIZE[dtype]}")
    elements[dtype] += numel
    return start, stop, name


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_checkpoint(folder: Path, files: list[str]) -> Checkpoint:
    """The checkpoint among ``files`` in ``folder``: ``model.safetensors``, or the index and every shard it names.

    Every shard the index names is parsed, and every tensor the index maps to a
    shard must be in that shard: a sharded model that would load partly random
    weights is refused here.
    """
    if "model.safetensors.index.json" not in files:
        if "model.safetensors" not in files:
            raise UnsupportedModel("no weights: model.safetensors or model.safetensors.index.json is required")
        return read_header(folder / "model.safetensors")
    index_path = folder / "model.safetensors.index.json"
    try:
        if index_path.stat().st_size > MAX_INDEX:
            raise UnsupportedModel(f"{index_path.name}: larger than {MAX_INDEX} bytes")
        with os.fdopen(open_regular(folder, index_path.name), "rb") as handle:
            index = json.loads(handle.read(MAX_INDEX + 1))
    except (OSError, ValueError, RecursionError) as exc:
        raise UnsupportedModel(f"{index_path.name}: unreadable ({type(exc).__name__})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UnsupportedModel(f"{index_path.name}: no weight_map table")
    shards: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        if not is_weights_shard(shard) or shard not in files:
            raise UnsupportedModel(f"{index_path.name}: maps {tensor!r} to {shard!r}, not a shard of this model")
        shards.setdefault(shard, set()).add(tensor)
    total = Checkpoint()
    for shard, tensors in sorted(shards.items()):
        found = read_header(folder / shard)
        if missing := tensors - found.names:
            raise UnsupportedModel(f"{shard}: lacks {len(missing)} tensors the index maps to it, e.g. {min(missing)!r}")
        total = total + found
    return total
