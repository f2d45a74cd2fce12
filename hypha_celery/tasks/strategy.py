"""The message strategy of hypha tasks: Celery's default, made safe against malformed bodies.

A message whose headers name a hypha task but whose body is not a task
message (``null``, a number, a raw ``application/data`` body) makes Celery's
default strategy raise ``TypeError``/``ValueError``, which stops the whole
worker - and the message, restored to the queue, stops the next worker too.
Here such a message becomes ``InvalidTaskError``, which Celery logs and
discards, and the worker keeps serving.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default

__all__ = ["guarded"]


def guarded(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    inner = default(task, app, consumer, **kwargs)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **more: Any) -> Any:
        payload = body if body is not None else getattr(message, "payload", None)
        if message.headers.get("task") and not _is_task_body(payload):
            raise InvalidTaskError(f"malformed {task.name} message: the body is not [args, kwargs, options]")
        try:
            return inner(message, body, ack, reject, callbacks, **more)
        except (TypeError, ValueError, AttributeError, IndexError) as exc:
            raise InvalidTaskError(f"malformed {task.name} message: {type(exc).__name__}: {exc}") from exc

    return task_message_handler


def _is_task_body(payload: Any) -> bool:
    """Celery protocol 2: ``[args (list), kwargs (object), embed (object)]``."""
    return (
        isinstance(payload, (list, tuple))
        and len(payload) == 3
        and isinstance(payload[0], (list, tuple))
        and isinstance(payload[1], dict)
        and isinstance(payload[2], dict)
    )
