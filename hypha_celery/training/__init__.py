"""Training across workers, from the scheduler's side: :func:`diloco` (:mod:`.scheduler`).

Importing this package imports nothing else; ``diloco`` loads Celery and the client on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hypha_celery.training.scheduler import DilocoJob, diloco

__all__ = ["DilocoJob", "diloco"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hypha_celery.training import scheduler as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
