"""Training, on a worker and across workers, in one package.

``job.py`` (what ``hypha.train`` does around the executor: sizing, the run, checkpoints copied and discarded),
``finetune/`` (the executor's full and LoRA fine-tuning), ``checkpoints/`` (resuming a redelivered run),
``distributed/`` (DiLoCo: inner and outer steps, their storage layout, the scheduler's side).
From the scheduler's side the entry point is :func:`diloco` (:mod:`.distributed.scheduler`).

Importing this package imports nothing else; ``diloco`` loads Celery and the client on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hypha_celery.training.distributed.scheduler import DilocoJob, diloco

__all__ = ["DilocoJob", "diloco"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hypha_celery.training.distributed import scheduler as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
