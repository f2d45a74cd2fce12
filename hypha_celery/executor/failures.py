"""The reply an executor sends for a failure: the named error the worker rebuilds, or the task's traceback.

Shared by the executor's request loop (:mod:`hypha_celery.executor.child`) and its serving loop
(:mod:`hypha_celery.executor.continuous`), whose rows fail one at a time.
"""

from __future__ import annotations

import traceback

from hypha_celery.errors import HyphaError
from hypha_celery.protocol import Error

__all__ = ["error_reply"]

_ALLOCATION_FAILURES = ("can't allocate memory", "DefaultCPUAllocator", "out of memory", "CUDA out of memory")


def error_reply(exc: BaseException) -> Error:
    """The reply for a failure: a hypha error by its class, an unexpected one with its traceback."""
    message = str(exc)
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(marker in message for marker in _ALLOCATION_FAILURES)
    ):
        return Error(
            type="MemoryLimitExceeded",
            message="the task tried to allocate more memory than it reserved: "
            + (message.splitlines() or ["MemoryError"])[0][:300],
        )
    if isinstance(exc, HyphaError):
        return Error(type=type(exc).__name__, message=message)
    return Error(
        type="ExecutionError",
        message=f"{type(exc).__name__}: {message}"[:2000],
        traceback="".join(traceback.format_exception(exc))[-4000:],
    )
