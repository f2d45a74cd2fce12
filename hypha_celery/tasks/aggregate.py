"""``hypha.aggregate``: DiLoCo's outer step, registered and wired.

The work (arguments, checks of every delta, the combination, the next version) is
:mod:`hypha_celery.training.distributed.outer`.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.pipeline import run_task
from hypha_celery.training.distributed.outer import run_outer, validate_aggregate

__all__ = ["aggregate"]


@shared_task(name="hypha.aggregate", base=HyphaTask, bind=True)
def aggregate(self: HyphaTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Apply one DiLoCo round's outer step and publish the next global model version."""
    return run_task(self, kwargs, args=args, validate=lambda ctx: validate_aggregate(ctx, args, kwargs),
                    body=run_outer)
