"""``hypha.noop``: the full admission path with no ML work (probes, benchmarks, tests).

It verifies, validates, reserves ``requirements``, optionally holds the
reservation for ``hold_s`` seconds, and releases - what every hypha task
costs on top of its model.
"""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from hypha_celery.stages.results import package
from hypha_celery.stages.validation import NoopSpec, validate_noop
from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.pipeline import Run, run_task

__all__ = ["noop"]


def _run(run: Run, spec: NoopSpec) -> dict[str, Any]:
    if spec.hold_s:
        time.sleep(min(spec.hold_s, run.remaining_s))
    run.timing.finished_at = time.time()
    return package(output=None, model=None, worker=run.worker, lease=run.lease, timing=run.timing)


@shared_task(name="hypha.noop", base=HyphaTask, bind=True)
def noop(self: HyphaTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Reserve ``requirements``, hold them ``hold_s`` seconds, release."""
    return run_task(
        self,
        kwargs,
        args=args,
        validate=lambda ctx: validate_noop(ctx.config, args, kwargs),
        body=_run,
        announce=False,
    )
