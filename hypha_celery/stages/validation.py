"""Validate a task's keyword arguments before it may reserve anything.

Each task kind has one ``validate_*`` function returning a frozen spec, or
raising the named error a person can act on: ``InvalidTask`` (schema, types),
``InvalidInput`` (inputs), ``UnsupportedModel`` (model id), and the per-task
caps (``ExcessiveMemoryRequest``, ``InsufficientCpu``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import InvalidInput, InvalidTask, UnsupportedModel
from hypha_celery.models.manifest import DATASET_MANIFEST, Manifest, validate_model_id
from hypha_celery.models.store import ModelStore
from hypha_celery.models.tensors import check_inputs
from hypha_celery.resources.requirements import Requirements, check_caps

__all__ = ["InferSpec", "NoopSpec", "TrainSpec", "validate_infer", "validate_noop", "validate_train"]


@dataclass(frozen=True)
class InferSpec:
    model: str
    inputs: Any
    requirements: Requirements
    manifest: Manifest | None


@dataclass(frozen=True)
class TrainSpec:
    model: str
    data: dict[str, Any]
    epochs: int
    lr: float
    batch_size: int
    new_model: str
    requirements: Requirements
    manifest: Manifest | None


@dataclass(frozen=True)
class NoopSpec:
    requirements: Requirements
    hold_s: float


def _check_shape(args: Sequence[Any], kwargs: Mapping[str, Any], allowed: set[str], required: set[str], task: str) -> None:
    if args:
        raise InvalidTask(f"{task} takes keyword arguments only ({', '.join(sorted(allowed))}); got {len(args)} positional")
    if not isinstance(kwargs, Mapping):
        raise InvalidTask(f"{task} kwargs must be an object")
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise InvalidTask(f"{task} got an unknown argument {unknown[0]!r} (it takes {', '.join(sorted(allowed))})")
    missing = sorted(required - set(kwargs))
    if missing:
        raise InvalidTask(f"{task} is missing the required argument {missing[0]!r}")


def requirements_for(cfg: WorkerConfig, raw: Any) -> Requirements:
    """Parse a task's requirements and hold them to this worker's per-task caps."""
    req = Requirements.parse(raw)
    check_caps(req, max_memory_per_task=cfg.max_memory_per_task, max_cpu_cores_per_task=cfg.max_cpu_cores_per_task)
    return req


def _local_manifest(store: ModelStore, model: str) -> Manifest | None:
    """The manifest if the model is here; ``None`` if it must be fetched (after admission)."""
    if store.has(model):
        return store.manifest(model)
    if not store.sources:
        known = ", ".join(store.list()[:20]) or "none"
        raise UnsupportedModel(f"model {model!r} is not in this worker's store (models here: {known})")
    return None


def validate_infer(cfg: WorkerConfig, store: ModelStore, args: Sequence[Any], kwargs: Mapping[str, Any]) -> InferSpec:
    _check_shape(args, kwargs, {"model", "inputs", "requirements"}, {"model", "inputs"}, "hypha.infer")
    model = validate_model_id(kwargs["model"])
    requirements = requirements_for(cfg, kwargs.get("requirements"))
    manifest = _local_manifest(store, model)
    if manifest is not None:
        check_inputs(kwargs["inputs"], manifest.input_shape, max_bytes=cfg.security.max_input_bytes, model=model)
    elif not isinstance(kwargs["inputs"], (list, dict)):
        raise InvalidInput("inputs must be a nested list of numbers or an encoded tensor object")
    return InferSpec(model=model, inputs=kwargs["inputs"], requirements=requirements, manifest=manifest)


def _int_arg(kwargs: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = kwargs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidTask(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def validate_train(
    cfg: WorkerConfig, store: ModelStore, args: Sequence[Any], kwargs: Mapping[str, Any], task_id: str
) -> TrainSpec:
    allowed = {"model", "data", "epochs", "lr", "batch_size", "requirements", "new_model"}
    _check_shape(args, kwargs, allowed, {"model", "data"}, "hypha.train")
    model = validate_model_id(kwargs["model"])
    requirements = requirements_for(cfg, kwargs.get("requirements"))
    epochs = _int_arg(kwargs, "epochs", 10, 1, 1_000_000)
    batch_size = _int_arg(kwargs, "batch_size", 32, 1, 65_536)
    lr = kwargs.get("lr", 1e-3)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not 0 < lr <= 10:
        raise InvalidTask(f"lr must be a number in (0, 10], got {lr!r}")
    new_model = validate_model_id(kwargs.get("new_model") or f"{model}-ft-{task_id.replace('-', '')[:12]}")
    if store.has(new_model):
        raise InvalidTask(f"new_model {new_model!r} already exists; model ids are immutable, pick another")
    data = kwargs["data"]
    manifest = _local_manifest(store, model)
    if isinstance(data, Mapping) and set(data) == {"ref"}:
        ref = validate_model_id(data["ref"])
        if not (store.path(ref) / DATASET_MANIFEST).is_file() and not store.sources:
            raise UnsupportedModel(f"data set {ref!r} is not in this worker's store and no sources are configured")
    elif not isinstance(data, Mapping) or set(data) != {"inputs", "targets"}:
        raise InvalidTask("data must be {'inputs': [...], 'targets': [...]} or {'ref': '<data set id>'}")
    elif manifest is not None:
        batch = check_inputs(data["inputs"], manifest.input_shape, max_bytes=cfg.security.max_input_bytes, model=model)
        targets = data["targets"]
        if not isinstance(targets, list) or len(targets) != batch.rows:
            raise InvalidInput(f"data.targets must be a list of {batch.rows} targets, one per input row")
    return TrainSpec(model=model, data=dict(data), epochs=epochs, lr=float(lr), batch_size=batch_size,
                     new_model=new_model, requirements=requirements, manifest=manifest)


def validate_noop(cfg: WorkerConfig, args: Sequence[Any], kwargs: Mapping[str, Any]) -> NoopSpec:
    _check_shape(args, kwargs, {"requirements", "hold_s"}, set(), "hypha.noop")
    hold = kwargs.get("hold_s", 0)
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold <= cfg.task_timeout:
        raise InvalidTask(f"hold_s must be a number from 0 to task_timeout ({cfg.task_timeout:g}), got {hold!r}")
    return NoopSpec(requirements=requirements_for(cfg, kwargs.get("requirements")), hold_s=float(hold))
