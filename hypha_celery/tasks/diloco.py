"""``hypha.train`` with a ``diloco`` block: one worker's inner steps of a DiLoCo round, wired.

The work is :mod:`hypha_celery.training.distributed.inner`; ``hypha.train``
(:mod:`hypha_celery.tasks.train`) hands a task with a ``diloco`` kwarg here, verified, validated and
admitted like any train task.
"""

from __future__ import annotations

from typing import Any

from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.pipeline import run_task
from hypha_celery.training.distributed.inner import run_inner, validate_inner

__all__ = ["train_round"]


def train_round(task: HyphaTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run ``hypha.train`` with a ``diloco`` block through every stage of a task."""
    return run_task(task, kwargs, args=args, validate=lambda ctx: validate_inner(ctx, args, kwargs, task.request.id),
                    body=run_inner)
