"""DiLoCo's arithmetic on safetensors files: pseudo-gradients and the outer Nesterov step.

Numpy (``safetensors.numpy``), never torch: the inner task computes its delta
in the worker's process from two stored checkpoints after the executor trained
(so the training code stays as it is), and the outer step (in a job executor,
:mod:`.apply`) averages deltas into the next global version. Checkpoints are read
one tensor at a time (:mod:`.weights`: one file, a sharded index, an adapter).

Sign convention (the DiLoCo paper's, arXiv 2311.08105): a pseudo-gradient is
``base - trained``, so it points like a gradient, and the outer step descends
it as SGD with Nesterov momentum does (``torch.optim.SGD(nesterov=True)``)::

    g      = sum(w_i * delta_i) / sum(w_i)      (w_i: the scheduler's shard sizes; or a robust combination)
    m      = momentum * m_prev + g              (m_prev = 0 in the first round)
    update = g + momentum * m
    next   = base - outer_lr * update

With ``outer_lr = 1`` and ``momentum = 0`` the next version is the
weighted average of the workers' trained weights (FedAvg). Float
checkpoints only: float16/32/64 and bfloat16 (numpy's through ``ml_dtypes``, the
dtype most published checkpoints use); the arithmetic is done in float32/64 and
the next version keeps the base's dtypes. Every file carries its job, round and base sha256 in its
safetensors metadata, and a delta is checked against them and the base's
tensor names and shapes before it is used.

A delta from a stranger is checked for its values too, tensor by tensor so that
memory holds one tensor at a time (:func:`scan_delta`): every value finite, and
its L2 norm returned for the outer step to bound against the round's median and
the base's norm. The deltas are then combined tensor by tensor
(:func:`combine`) by one of :data:`AGGREGATORS`: ``mean`` weighted by what the
scheduler decided (each shard's size), or the coordinate-wise ``trimmed_mean``
or ``median`` (unweighted), which a poisoned minority cannot drag far.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from hypha_celery.errors import DeltaRejected, UnsupportedModel
from hypha_celery.training.distributed.weights import Weights

if TYPE_CHECKING:
    import numpy as np

__all__ = ["AGGREGATORS", "WeightedMean", "combine", "combine_stack", "l2_norm", "load_weights",
           "nesterov", "outer_step", "pseudo_gradient", "save_tensors", "scan_delta", "shapes_of"]

AGGREGATORS = ("mean", "trimmed_mean", "median")

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def load_weights(path: Path, what: str) -> dict[str, np.ndarray]:
    """A float checkpoint's tensors by name (``what`` names it in errors)."""
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors.numpy then reads and writes
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, TypeError) as exc:  # a dtype numpy lacks (float8), a garbled header
        raise UnsupportedModel(f"{what}: DiLoCo reads float16/bfloat16/32/64 safetensors only ({exc})") from None
    for name, tensor in tensors.items():
        if str(tensor.dtype) not in _FLOATS:
            raise UnsupportedModel(f"{what}: tensor {name} is {tensor.dtype}; DiLoCo reads float16/bfloat16/32/64 "
                                   "tensors only")
    return tensors


def save_tensors(tensors: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(path), metadata={"format": "pt", **metadata})


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata() or {})


def pseudo_gradient(base: Path | Weights, trained: Path | Weights, out: Path | None = None,
                    metadata: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """``base - trained`` (float32), written to ``out`` when given; the two checkpoints (one file each, or
    :class:`.weights.Weights`: a sharded model, an adapter) must hold the same tensors. Read one tensor at a time."""
    import numpy as np

    start, end = _weights(base, "the round's base"), _weights(trained, "the trained model")
    if start.shapes.keys() != end.shapes.keys():
        differ = sorted(start.shapes.keys() ^ end.shapes.keys())
        raise UnsupportedModel(f"the trained model's tensors differ from its base's (e.g. {differ[0]})")
    delta = {}
    with start, end:
        for name in start.names():
            if start.shapes[name] != end.shapes[name]:
                raise UnsupportedModel(f"tensor {name}: trained shape {end.shapes[name]} is not the base's "
                                       f"{start.shapes[name]}")
            delta[name] = (start.tensor(name).astype(np.float32) - end.tensor(name).astype(np.float32)
                           ).astype(np.float32)
    if out is not None:
        save_tensors(delta, out, metadata or {})
    return delta


def _weights(source: Path | Weights, what: str) -> Weights:
    if isinstance(source, Weights):
        return source
    try:
        return Weights.read(source.parent, [source.name], what)
    except UnsupportedModel as exc:
        raise UnsupportedModel(f"{exc} (DiLoCo reads float16/bfloat16/32/64 safetensors only)") from None


def scan_delta(path: Path, shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, str], what: str, *,
               order: Sequence[str] | None = None) -> float:
    """The decoded delta's L2 norm, once its metadata says ``expected``, its encoding's checks pass
    (:func:`.compression.decoded`: names, dtypes, shapes, scales) and every decoded value is finite; read one
    tensor at a time (``DeltaRejected`` naming the first fault)."""
    import numpy as np

    from hypha_celery.training.distributed.compression import decoded

    try:
        metadata = read_metadata(path)
    except Exception as exc:  # safetensors raises its own error types for a garbled file
        raise DeltaRejected(f"{what}: not a safetensors file ({exc})") from None
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise DeltaRejected(f"{what}: it is for {key} {metadata.get(key)!r}, not {value!r}; refused")
    squares = 0.0
    with decoded(path, shapes, what, order) as tensors:
        for name, tensor in tensors:
            wide = tensor.astype(np.float64)
            if not np.isfinite(wide).all():
                raise DeltaRejected(f"{what}: tensor {name} holds NaN or infinite values; refused")
            squares += float(np.dot(wide.ravel(), wide.ravel()))
    return math.sqrt(squares)  # inf when the squares overflow float64: above any bound


def shapes_of(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape by name: what a delta's tensors are checked against."""
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def l2_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all ``tensors`` together, in float64."""
    import numpy as np

    return math.sqrt(sum(float(np.dot(w.ravel(), w.ravel())) for w in (t.astype(np.float64) for t in tensors.values())))


def combine_stack(stack: np.ndarray, weights: Sequence[float], aggregator: str, trim: float) -> np.ndarray:
    """One tensor's combination over its deltas (``stack``'s first axis), by ``aggregator``.

    ``mean`` weighs delta ``i`` by ``weights[i]``; ``median`` is numpy's coordinate-wise median;
    ``trimmed_mean`` drops, at each coordinate, the ``ceil(trim * n)`` lowest and highest values (at most
    ``(n - 1) // 2`` each side, so one remains) and averages the rest. The robust two ignore ``weights``.
    """
    import numpy as np

    if aggregator == "mean":
        w = np.asarray(weights, dtype=np.float64)
        return np.tensordot(w / w.sum(), stack, axes=1)
    if aggregator == "median":
        return np.median(stack, axis=0)
    if aggregator == "trimmed_mean":
        n = stack.shape[0]
        cut = min(math.ceil(trim * n), (n - 1) // 2)
        return np.sort(stack, axis=0)[cut:n - cut].mean(axis=0)
    raise ValueError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {aggregator!r}")


def combine(paths: Sequence[Path], weights: Sequence[float], shapes: Mapping[str, tuple[int, ...]], *,
            aggregator: str = "mean", trim: float = 0.0) -> dict[str, np.ndarray]:
    """The deltas in ``paths``, decoded (:func:`.compression.decoded`), combined tensor by tensor
    (:func:`combine_stack`), float64: one tensor of each delta in memory at a time. The paths must have passed
    :func:`scan_delta`."""
    import numpy as np

    from hypha_celery.training.distributed.compression import decoded

    if not paths or len(paths) != len(weights):
        raise DeltaRejected("the outer step needs at least one delta, each with its weight")
    out = {}
    with ExitStack() as stack:
        readers = [stack.enter_context(decoded(path, shapes, f"delta {path.name}")) for path in paths]
        for rows in zip(*readers, strict=True):
            name = rows[0][0]
            out[name] = combine_stack(np.stack([tensor.astype(np.float64) for _, tensor in rows]), weights,
                                      aggregator, trim)
    return out


class WeightedMean:
    """The weighted mean of deltas added one at a time: one delta and the running sum in memory."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.samples = 0

    def add(self, delta: Mapping[str, np.ndarray], samples: int) -> None:
        import numpy as np

        for name, tensor in delta.items():
            weighted = tensor.astype(np.float64) * samples
            self.sums[name] = weighted if name not in self.sums else self.sums[name] + weighted
        self.samples += samples

    def mean(self) -> dict[str, np.ndarray]:
        if self.samples <= 0:
            raise DeltaRejected("the outer step needs at least one delta with samples")
        return {name: total / self.samples for name, total in self.sums.items()}


def nesterov(base: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray],
             previous: Mapping[str, np.ndarray] | None, *, lr: float, momentum: float
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The next weights and momentum from the base, the averaged pseudo-gradient and the last round's momentum.

    ``DeltaRejected`` naming the tensor when a new weight or the momentum is not finite once cast back (a float16
    base overflows at 65504): nothing is returned to publish."""
    import numpy as np

    weights, velocity = {}, {}
    for name, tensor in base.items():
        g = average[name].astype(np.float64)
        m = g if previous is None else momentum * previous[name].astype(np.float64) + g
        with np.errstate(over="ignore"):  # an overflow in the cast is refused just below, by name
            weights[name] = (tensor.astype(np.float64) - lr * (g + momentum * m)).astype(tensor.dtype)
            velocity[name] = m.astype(np.float32)
        for what, value in (("weights", weights[name]), ("momentum", velocity[name])):
            if not np.isfinite(value.astype(np.float64)).all():
                raise DeltaRejected(f"the outer step would publish non-finite weights: tensor {name}'s {what} "
                                    f"overflow {value.dtype}; refused, nothing published")
    return weights, velocity


def outer_step(base: Mapping[str, np.ndarray], deltas: Sequence[tuple[Mapping[str, np.ndarray], int]],
               previous: Mapping[str, np.ndarray] | None, *, lr: float, momentum: float
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`nesterov` on the weighted mean of ``(delta, weight)`` pairs, added in the order given."""
    mean = WeightedMean()
    for delta, samples in deltas:
        mean.add(delta, samples)
    return nesterov(base, mean.mean(), previous, lr=lr, momentum=momentum)
