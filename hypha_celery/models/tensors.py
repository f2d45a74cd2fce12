"""Checking a task's inputs in the worker, before any executor sees them; imports no torch.

Inputs are JSON in one of two forms: a nested list of numbers, or the compact
base64 tensor form::

    {"dtype": "float32", "shape": [N, 4], "data": "<base64 of the raw little-endian bytes>"}

Either may hold one sample (the model's per-sample shape) or a batch
(``[N, *shape]``); in either form a NaN or an infinity is refused. :func:`check_inputs` checks structure, shape and size, so a
malformed or oversized task is refused before it reserves resources or
reaches an executor. Turning inputs into tensors, and outputs back into the
input's form, is :mod:`hypha_celery.runtimes.codec`'s, inside the executor.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypha_celery.errors import InvalidInput
from hypha_celery.units import format_size

# Shared by validation (before any executor) and the runtimes that apply them in the executor.
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded RGB: 48 MiB an image before the processor resizes it
MAX_TRAIN_LENGTH = 2048  # tokens of one training text, unless the model's own maximum is lower

__all__ = ["DTYPES", "MAX_IMAGE_PIXELS", "MAX_TRAIN_LENGTH", "Batch", "check_inputs", "resolve_labels"]

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "uint8": 1}
# Float dtype -> (bytes, the exponent bits): an element whose exponent bits are all set is NaN or infinite.
FLOAT_EXPONENTS = {
    "float16": (2, 0x7C00),
    "bfloat16": (2, 0x7F80),
    "float32": (4, 0x7F800000),
    "float64": (8, 0x7FF0000000000000),
}
NOT_FINITE = "inputs must be finite numbers: NaN and infinity are refused"


@dataclass(frozen=True)
class Batch:
    """Validated inputs: ``rows`` samples of the model's per-sample shape."""

    rows: int


MAX_DEPTH = 16


def _shape_of(value: Any, max_elements: int) -> list[int]:
    """Shape of a rectangular nested list of numbers; ``InvalidInput`` if ragged or not numbers."""
    shape: list[int] = []
    level = value
    while isinstance(level, list):
        if not level:
            raise InvalidInput("inputs contain an empty list")
        if len(shape) == MAX_DEPTH:
            raise InvalidInput(f"inputs are nested deeper than {MAX_DEPTH} levels")
        shape.append(len(level))
        level = level[0]
    if math.prod(shape) > max_elements:
        raise InvalidInput(f"inputs hold {math.prod(shape)} numbers, above the cap of {max_elements}")
    _check_rectangular(value, shape, 0)
    return shape


def _check_rectangular(value: Any, shape: list[int], depth: int) -> None:
    if depth == len(shape):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"inputs must be numbers, found {type(value).__name__} {value!r:.40}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(NOT_FINITE)
        return
    if not isinstance(value, list) or len(value) != shape[depth]:
        raise InvalidInput(f"inputs are ragged: expected {shape[depth]} items at depth {depth}")
    for item in value:
        _check_rectangular(item, shape, depth + 1)


def check_inputs(inputs: Any, sample_shape: Sequence[int], *, max_bytes: int, model: str = "model") -> Batch:
    """Validate ``inputs`` against a model's per-sample shape and the size cap."""
    sample_shape = list(sample_shape)
    if isinstance(inputs, dict):
        return _check_encoded(inputs, sample_shape, max_bytes, model)
    if not isinstance(inputs, list):
        raise InvalidInput(f"inputs must be a nested list of numbers or an encoded tensor object, got {type(inputs).__name__}")
    shape = _shape_of(inputs, max(1, max_bytes // 4))
    return Batch(rows=_rows(shape, sample_shape, model))


def _rows(shape: list[int], sample_shape: list[int], model: str) -> int:
    """How many samples of ``sample_shape`` a tensor of ``shape`` holds (one, or a batch)."""
    if shape == sample_shape:
        return 1
    if len(shape) == len(sample_shape) + 1 and shape[1:] == sample_shape:
        return shape[0]
    raise InvalidInput(
        f"inputs have shape {shape}; {model} takes {sample_shape} per sample (or [N, {', '.join(map(str, sample_shape))}])"
    )


def _check_encoded(inputs: dict[str, Any], sample_shape: list[int], max_bytes: int, model: str) -> Batch:
    extra = sorted(set(inputs) - {"dtype", "shape", "data"})
    if extra or not {"dtype", "shape", "data"} <= set(inputs):
        raise InvalidInput("an encoded tensor needs exactly 'dtype', 'shape' and 'data' (base64)")
    dtype, shape, data = inputs["dtype"], inputs["shape"], inputs["data"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidInput(f"encoded dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise InvalidInput(f"encoded shape must be a list of positive integers, got {shape!r}")
    if not isinstance(data, str):
        raise InvalidInput("encoded data must be a base64 string")
    expected = math.prod(shape) * DTYPES[dtype]
    if expected > max_bytes or len(data) > (max_bytes * 4) // 3 + 8:
        size = max(expected, len(data) * 3 // 4)
        raise InvalidInput(f"inputs are {format_size(size)}, above the cap of {format_size(max_bytes)} (max_input_bytes)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("encoded data is not valid base64") from None
    if len(raw) != expected:
        raise InvalidInput(f"encoded data has {len(raw)} bytes; shape {shape} of {dtype} needs {expected}")
    if dtype in FLOAT_EXPONENTS and not _all_finite(raw, dtype):
        raise InvalidInput(NOT_FINITE)
    return Batch(rows=_rows(shape, sample_shape, model))


def _all_finite(raw: bytes, dtype: str) -> bool:
    """No NaN or infinity in little-endian ``raw`` of a float ``dtype``: no element with every exponent bit set."""
    import numpy as np  # the worker's extra; imported here so a scheduler importing this module needs none

    width, mask = FLOAT_EXPONENTS[dtype]
    words = np.frombuffer(raw, dtype=f"<u{width}")
    exponent = np.asarray(mask, dtype=words.dtype)
    return not bool(np.any((words & exponent) == exponent))


def resolve_labels(raw: list[Any], names: list[str]) -> list[int]:
    """Class ids for labels given as names (``id2label``'s) or ids; ``InvalidInput`` naming the first bad one."""
    ids = []
    for index, label in enumerate(raw):
        if isinstance(label, str) and label in names:
            ids.append(names.index(label))
        elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
            ids.append(label)
        else:
            raise InvalidInput(f"data.labels[{index}] is {label!r}: use a label name ({', '.join(names)}) or an id "
                               f"from 0 to {len(names) - 1}")
    return ids
