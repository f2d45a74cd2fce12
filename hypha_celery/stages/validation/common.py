"""What every task kind's validation shares: the task's requirements held to this worker's caps, the model read
from the store (or left to be fetched), the model pin, and the limits on texts."""

from __future__ import annotations

from typing import Any

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import InvalidTask, ModelPinMismatch, UnsupportedModel
from hypha_celery.manifest import Manifest
from hypha_celery.models.store import ModelStore
from hypha_celery.resources.requirements import Requirements, check_caps
from hypha_celery.stages.validation.arguments import Arg

__all__ = ["MAX_TEXT_CHARS", "MODEL", "REQUIREMENTS", "check_model_pin", "local_manifest", "requirements_for"]

# Per text. Texts past the model's max_length are truncated anyway: the character cap bounds tokenising.
MAX_TEXT_CHARS = 32_768
# Checked by their own parsers (validate_model_id: UnsupportedModel; Requirements.parse: InvalidTask).
MODEL = Arg("model", required=True)
REQUIREMENTS = Arg("requirements")


def requirements_for(cfg: WorkerConfig, raw: Any, *, sizable: bool = False) -> Requirements:
    """Parse a task's requirements and hold them to this worker's per-task caps.

    ``"auto"`` sizes are for tasks on a model (``sizable``); sizing replaces them
    before admission (:mod:`hypha_celery.stages.sizing`).
    """
    req = Requirements.parse(raw)
    if req.auto and not sizable:
        raise InvalidTask(f"requirements.{sorted(req.auto)[0]} 'auto' is sized from a model's manifest for "
                          "hypha.infer, hypha.generate and hypha.train on transformers models; give this task a size")
    check_caps(req, max_memory_per_task=cfg.max_memory_per_task, max_cpu_cores_per_task=cfg.max_cpu_cores_per_task)
    return req


def local_manifest(store: ModelStore, model: str) -> Manifest | None:
    """The manifest if the model is here; ``None`` if it must be fetched (after admission)."""
    if store.has(model):
        return store.manifest(model)
    if not store.sources:
        known = ", ".join(store.list()[:20]) or "none"
        raise UnsupportedModel(f"model {model!r} is not in this worker's store (models here: {known})")
    return None


def check_model_pin(store: ModelStore, model: Any, pin: str | None) -> None:
    """Refuse (``ModelPinMismatch``) a task pinned by ``model_sha256`` to a manifest the store's ``model`` lacks.

    A model not in the store yet passes: the task checks it again once it is fetched, under the lease.
    """
    if pin is None:
        return
    if not isinstance(model, str):
        raise InvalidTask("model_sha256 pins the task's model, but this task names none")
    if not store.has(model):
        return
    held = store.manifest_sha256(model)
    if held != pin:
        raise ModelPinMismatch(f"model {model!r}: the task pins manifest sha256 {pin[:12]}..., this worker's store "
                               f"holds {held[:12]}... (another model under that id); refusing to run it")
