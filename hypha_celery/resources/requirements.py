"""What a task asks for: cores, memory, GPUs; parsed from its ``requirements`` kwarg.

CPU is counted in thousandths of a core, as Kubernetes does, so that many
small inference tasks can share a core (``cpu_cores = 0.25``); a request of a
core or more must be whole cores, which the ledger pins exclusively.

``memory`` and ``gpu_memory`` may be ``"auto"``: the worker sizes them from the
model's manifest before admission (:mod:`hypha_celery.stages.sizing`). Until
then they hold placeholders that only a scheduler's placement ever sees.

Requests to a serving executor (:data:`SERVING_TASKS`) share their device by
default: they name no ``cpu_cores`` and get a fraction of the shared pool
(``[worker.execution] serving_cpu_cores``; :data:`SERVING_CPU_MILLI` in a
scheduler's placement), and a GPU by their ``gpu_memory``, never alone unless
they ask ``gpu_exclusive``. A generation also carries ``kv``: the bytes of its
KV cache, which the ledger admits against the device's KV budget. Sizing sets
it; no task names it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hypha_celery.errors import ExcessiveMemoryRequest, InsufficientCpu, InvalidTask
from hypha_celery.units import format_size, parse_size

__all__ = ["AUTO", "SERVING_CPU_MILLI", "SERVING_TASKS", "Requirements", "check_caps"]

_FIELDS = ("cpu_cores", "memory", "gpus", "gpu_memory", "gpu_exclusive")
MILLI = 1000
# A task that names no memory still gets a reservation (and, with
# enforce_memory_limits, a cap): enough for a small model and its activations.
DEFAULT_MEMORY = 256 * 2**20
AUTO = "auto"
_AUTO_FIELDS = ("memory", "gpu_memory")
# What an unsized "auto" gpu_memory stands for in a scheduler's placement: any GPU
# with room (0 would mean a whole device). The worker sizes it before it reserves.
_AUTO_GPU_PLACEHOLDER = 2**20
# The tasks that run in a serving executor, beside the other requests for its device: they share it by default.
SERVING_TASKS = frozenset({"hypha.infer", "hypha.generate", "hypha.verify"})
# What a serving request reserves of the CPU unless it names cpu_cores ([worker.execution] serving_cpu_cores).
SERVING_CPU_MILLI = 100


@dataclass(frozen=True)
class Requirements:
    """A task's reservation request. ``gpu_memory`` is per device; 0 means the whole device.

    ``kv``: KV-cache bytes (part of ``memory``, or of ``gpu_memory`` on a GPU) counted against the
    device's KV budget as well. ``gpu_exclusive``: True holds each GPU alone, False shares it by
    ``gpu_memory``, None leaves it to the node (``[worker.execution] gpu_sharing``).
    """

    cpu_milli: int = MILLI
    memory: int = DEFAULT_MEMORY
    gpus: int = 0
    gpu_memory: int = 0
    auto: frozenset[str] = frozenset()  # fields asked as "auto": sized from the model before admission
    kv: int = 0
    gpu_exclusive: bool | None = None

    @property
    def cpu_cores(self) -> float:
        return self.cpu_milli / MILLI

    @classmethod
    def parse(cls, raw: Any, *, auto_by_default: bool = False, serving_cpu_milli: int | None = None
              ) -> Requirements:
        """Validate a ``requirements`` kwarg; every problem is an ``InvalidTask`` naming the field.

        With ``auto_by_default`` (tasks on models the worker can size), an
        absent ``memory`` is ``"auto"``, and so is an absent ``gpu_memory`` when GPUs are asked for.
        ``serving_cpu_milli``: a request to a serving executor, which shares its device: an absent
        ``cpu_cores`` is that many thousandths, and an absent ``gpu_exclusive`` is false.
        """
        if raw is None:
            raw = {}
        if isinstance(raw, Requirements):
            return raw
        if not isinstance(raw, Mapping):
            raise InvalidTask(f"requirements must be an object with {', '.join(_FIELDS)}; got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_FIELDS))
        if unknown:
            raise InvalidTask(f"requirements.{unknown[0]} is not a requirement (known: {', '.join(_FIELDS)})")
        cpu_milli = _cpu_milli(raw["cpu_cores"]) if "cpu_cores" in raw else \
            serving_cpu_milli if serving_cpu_milli is not None else MILLI
        exclusive = raw.get("gpu_exclusive", None if serving_cpu_milli is None else False)
        if exclusive is not None and not isinstance(exclusive, bool):
            raise InvalidTask(f"requirements.gpu_exclusive must be true or false, got {str(exclusive)[:40]}")
        gpus = raw.get("gpus", 0)
        if isinstance(gpus, bool) or not isinstance(gpus, int) or not 0 <= gpus <= 1024:
            raise InvalidTask(f"requirements.gpus must be a whole number from 0 to 1024, got {str(gpus)[:40]}")
        auto = {name for name in _AUTO_FIELDS if raw.get(name) == AUTO}
        if auto_by_default:
            auto |= {name for name in _AUTO_FIELDS if name not in raw and (name == "memory" or gpus)}
        memory = DEFAULT_MEMORY if "memory" in auto else \
            _size("memory", raw.get("memory", DEFAULT_MEMORY), allow_zero=False)
        gpu_memory = _AUTO_GPU_PLACEHOLDER if "gpu_memory" in auto else \
            _size("gpu_memory", raw.get("gpu_memory", 0), allow_zero=True)
        if gpu_memory and not gpus:
            gpus = 1
        return cls(cpu_milli=cpu_milli, memory=memory, gpus=gpus, gpu_memory=gpu_memory, auto=frozenset(auto),
                   gpu_exclusive=exclusive)

    def sized(self, *, memory: int, gpu_memory: int) -> Requirements:
        """These requirements with their ``"auto"`` fields set to sizes (the others stay as asked)."""
        return dataclasses.replace(
            self,
            memory=memory if "memory" in self.auto else self.memory,
            gpu_memory=gpu_memory if "gpu_memory" in self.auto else self.gpu_memory,
            auto=frozenset(),
        )

    def describe(self) -> str:
        """For error messages a person reads."""
        memory = "auto" if "memory" in self.auto else format_size(self.memory)
        parts = [f"{self.cpu_cores:g} cores", f"{memory} memory"]
        if self.gpus:
            per = "auto" if "gpu_memory" in self.auto else \
                format_size(self.gpu_memory) if self.gpu_memory else "a whole device"
            alone = " (held alone)" if self.gpu_exclusive else ""
            parts.append(f"{self.gpus} GPU(s) with {per} each{alone}")
        if self.kv:
            parts.append(f"{format_size(self.kv)} KV cache")
        return ", ".join(parts)


def _cpu_milli(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTask(f"requirements.cpu_cores must be a number, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        raise InvalidTask(f"requirements.cpu_cores must be a finite number, got {str(value)[:40]}")
    if value <= 0:
        raise InvalidTask(f"requirements.cpu_cores must be positive, got {value!r}")
    if value > 1_000_000:
        raise InvalidTask(f"requirements.cpu_cores of {value:.3g} is not a real machine's core count")
    milli = round(value * MILLI)
    if milli == 0:
        raise InvalidTask(f"requirements.cpu_cores must be at least 0.001, got {value!r}")
    if value > 1 and milli % MILLI:
        raise InvalidTask(f"requirements.cpu_cores above 1 must be whole cores, got {value!r}")
    return milli


def _size(name: str, value: Any, *, allow_zero: bool) -> int:
    if allow_zero and value == 0 and not isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise InvalidTask(f"requirements.{name} must not be negative, got {value!r}")
    try:
        return parse_size(value)
    except ValueError as exc:
        raise InvalidTask(f"requirements.{name}: {exc}") from None


def check_caps(req: Requirements, *, max_memory_per_task: int, max_cpu_cores_per_task: int) -> None:
    """The worker's per-task caps: over them a task can never run here, so fail now."""
    if "memory" not in req.auto and req.memory > max_memory_per_task:
        raise ExcessiveMemoryRequest(
            f"asked for {format_size(req.memory)} memory; this worker allows at most "
            f"{format_size(max_memory_per_task)} per task (max_memory_per_task)"
        )
    if req.cpu_milli > max_cpu_cores_per_task * MILLI:
        raise InsufficientCpu(
            f"asked for {req.cpu_cores:g} cores; this worker allows at most "
            f"{max_cpu_cores_per_task} per task (max_cpu_cores_per_task)"
        )
