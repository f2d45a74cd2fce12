"""``hypha.noop``'s arguments: requirements to reserve, and how long to hold them (``hold_s``, within
``task_timeout``); the task that exercises the pipeline without a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypha_celery.config import WorkerConfig
from hypha_celery.resources.requirements import Requirements
from hypha_celery.stages.validation.arguments import Arg, TaskArgs, check_arguments
from hypha_celery.stages.validation.common import REQUIREMENTS, requirements_for

__all__ = ["NoopSpec", "validate_noop"]


@dataclass(frozen=True)
class NoopSpec:
    requirements: Requirements
    hold_s: float


def validate_noop(cfg: WorkerConfig, args: Sequence[Any], kwargs: Mapping[str, Any]) -> NoopSpec:
    hold = Arg("hold_s", "number", 0, cfg.task_timeout, default=0.0, note=" (seconds, up to task_timeout)")
    values = check_arguments(TaskArgs("hypha.noop", (REQUIREMENTS, hold)), args, kwargs)
    return NoopSpec(requirements=requirements_for(cfg, kwargs.get("requirements")), hold_s=float(values["hold_s"]))
