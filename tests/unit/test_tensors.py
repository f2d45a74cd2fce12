"""Unit tests for the worker's input check (hypha_celery.models.tensors): both forms refuse the same inputs."""

from __future__ import annotations

import base64
import math
import struct

import pytest

from hypha_celery.errors import InvalidInput
from hypha_celery.models.tensors import check_inputs

SHAPE = [4]
CAP = 2**20


def encoded(dtype: str, values: list[float]) -> dict[str, object]:
    """``values`` as one sample of the base64 tensor form (bfloat16: the upper half of each float32)."""
    if dtype == "bfloat16":
        raw = b"".join(struct.pack("<f", v)[2:] for v in values)
    else:
        raw = struct.pack("<" + {"float16": "e", "float32": "f", "float64": "d"}[dtype] * len(values), *values)
    return {"dtype": dtype, "shape": [len(values)], "data": base64.b64encode(raw).decode()}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_a_non_finite_number_is_refused_in_both_forms(dtype: str, bad: float) -> None:
    # Given a sample with one NaN or infinity, as a nested list and as an encoded tensor
    values = [1.0, bad, 2.0, 3.0]
    # Then both forms are refused with the same error
    with pytest.raises(InvalidInput, match="finite") as listed:
        check_inputs([values], SHAPE, max_bytes=CAP)
    with pytest.raises(InvalidInput, match="finite") as packed:
        check_inputs(encoded(dtype, values), SHAPE, max_bytes=CAP)
    assert str(listed.value) == str(packed.value)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_finite_extremes_pass_in_both_forms(dtype: str) -> None:
    # Given the largest finite value of float16 (every form can hold it), zeros and a tiny number
    values = [65504.0, -65504.0, 0.0, 1e-3]
    # Then both forms are accepted as one sample
    assert check_inputs(values, SHAPE, max_bytes=CAP).rows == 1
    assert check_inputs(encoded(dtype, values), SHAPE, max_bytes=CAP).rows == 1


def test_integer_tensors_are_not_checked_for_nan_bit_patterns() -> None:
    # Given int32 data whose bits would read as NaN in float32
    raw = struct.pack("<4I", 0x7FC00000, 0xFFFFFFFF, 0x7F800000, 1)
    tensor = {"dtype": "int32", "shape": [4], "data": base64.b64encode(raw).decode()}
    # Then it is an ordinary integer tensor
    assert check_inputs(tensor, SHAPE, max_bytes=CAP).rows == 1
