"""The tensor payloads of ``hypha.infer`` and ``hypha.train``: rows in, rows out, in the client's own form.

A built-in or ONNX model's input is a nested list of numbers, or an encoded
tensor object ``{"dtype", "shape", "data"}`` (``data``: the raw little-endian
bytes, base64). :func:`decode` turns either into a torch tensor of rows;
:func:`encode` answers in the form the input came in (an encoded tensor is
answered by one, floating point; a list by a list of float32), and
:func:`is_single` tells a lone sample (answered without its batch axis) from
rows. One codec for every runtime that takes tensors, so their payloads agree.
Importing it imports torch: the runtimes that use it do.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

__all__ = ["DTYPES", "decode", "encode", "is_single"]

# An encoded tensor's ``dtype`` (and a built-in manifest's) as torch's dtype.
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}


def decode(inputs: Any, sample_shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``inputs`` (a nested list or an encoded tensor) as rows of ``sample_shape`` in ``dtype``."""
    if isinstance(inputs, dict):
        raw = base64.b64decode(inputs["data"])
        tensor = torch.frombuffer(bytearray(raw), dtype=DTYPES[inputs["dtype"]]).reshape(inputs["shape"])
    else:
        tensor = torch.tensor(inputs)
    return tensor.to(dtype).reshape(-1, *sample_shape)


def encode(tensor: torch.Tensor, like: Any, single: bool) -> Any:
    """``tensor``'s rows in the form of the input ``like`` (``single``: its one row, without the batch axis)."""
    if single:
        tensor = tensor[0]
    if isinstance(like, dict):
        out = tensor.detach().to("cpu").contiguous()
        if out.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            out = out.float()
        name = str(out.dtype).removeprefix("torch.")
        data = out.view(torch.uint8).numpy().tobytes() if out.dtype == torch.bfloat16 else out.numpy().tobytes()
        return {"dtype": name, "shape": list(out.shape), "data": base64.b64encode(data).decode("ascii")}
    return tensor.detach().to("cpu", torch.float32).tolist()


def is_single(item: Any, shape: list[int]) -> bool:
    """Whether ``item`` is one sample of ``shape`` (not rows of them)."""
    if isinstance(item, dict):
        return list(item["shape"]) == list(shape)
    depth, level = 0, item
    while isinstance(level, list):
        depth, level = depth + 1, level[0]
    return depth == len(shape)
