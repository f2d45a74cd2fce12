"""``hypha.train``: fine-tune a stored model and store the result as a new model.

Registration and wiring only: the job is :mod:`hypha_celery.training.job`; with a ``diloco`` block
the task is one inner task of a DiLoCo round (:mod:`hypha_celery.tasks.diloco`).
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.diloco import train_round
from hypha_celery.tasks.pipeline import run_task
from hypha_celery.training.job import run_training, validate_training

__all__ = ["train"]


@shared_task(name="hypha.train", base=HyphaTask, bind=True)
def train(self: HyphaTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data={"inputs": [...], "targets": [...]}``, ``{"texts": [...]}`` (with ``"labels"``
    for a classifier) or ``{"ref": "<data set>"}``; with ``diloco``, one inner task of a DiLoCo round."""
    if "diloco" in kwargs:  # train, then write the pseudo-gradient to shared storage
        return train_round(self, args, kwargs)
    return run_task(
        self,
        kwargs,
        args=args,
        validate=lambda ctx: validate_training(ctx, args, kwargs, self.request.id),
        body=run_training,
    )
