"""Malformed messages: refused with one log line and, where they name a task id, a final ``FAILURE``.

A message the worker cannot turn into a task - a body that does not decode
(not JSON, not UTF-8, a pickle or another content type this worker refuses),
a body that is not ``[args, kwargs, options]``, JSON that names one object
key twice (:mod:`hypha_celery.security.strict_json`; in the signed envelope it
is an ``InvalidSignature``), an unregistered task name -
is dropped and the worker keeps serving. Celery's own handlers would log a
traceback and a dump of the body for each (anyone who can publish could fill
the log), and leave a client waiting on the message's task id ``PENDING``
for ever. Here each such message is logged as one line, and when its headers
carry a task id the result backend gets a final ``FAILURE``:
``MalformedMessage`` with the reason (``NotRegistered``, Celery's own error,
for an unknown task name). A task id that already has a final state keeps it.

Two halves: :func:`guarded`, the message strategy of hypha's tasks (what
Celery calls with a message for a registered task, before anything is
decoded), and :class:`MessageGuardStep`, a consumer bootstep that replaces the
consumer's handlers for messages no strategy sees (an unknown task name, a
body without task headers that does not decode).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps, states
from celery.exceptions import NotRegistered
from celery.utils.collections import AttributeDict
from celery.worker.strategy import default

from hypha_celery.errors import InvalidSignature, MalformedMessage
from hypha_celery.security.envelope import ENVELOPE_HEADER
from hypha_celery.security.strict_json import DUPLICATE_HEADER, duplicate_key

__all__ = ["MessageGuardStep", "guarded", "refuse"]

log = logging.getLogger(__name__)

_MAX_ID = 255  # longest task id stored for a malformed message (Celery's are 36-character uuids)
_MAX_REASON = 300


def guarded(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy for ``task``, refusing malformed messages instead of raising."""
    inner = default(task, app, consumer, **kwargs)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **more: Any) -> Any:
        try:
            payload = body if body is not None else message.payload
        except Exception as exc:  # kombu raises DecodeError, ContentDisallowed, UnicodeError, ...
            return refuse(consumer, message, f"the body cannot be decoded: {_describe(exc)}")
        marked = _headers(message).get(DUPLICATE_HEADER)
        if marked is not None:  # the transport found a key twice in the message around the body
            where = str(marked)
            reason = f"the message names an object key twice ({where}): JSON readers disagree on which value counts"
            envelope = where.startswith(ENVELOPE_HEADER + ":")
            return refuse(consumer, message, reason, error=InvalidSignature(reason) if envelope else None)
        repeated = duplicate_key(message.body) if getattr(message, "content_type", None) == "application/json" else None
        if repeated is not None:
            return refuse(consumer, message, f"the body names the object key {repeated!r} twice: JSON readers "
                          "disagree on which value counts")
        if _headers(message).get("task") and not _is_task_body(payload):  # protocol 2 (v1 carries it in the body)
            return refuse(consumer, message, "the body is not [args, kwargs, options]")
        try:
            return inner(message, body, ack, reject, callbacks, **more)
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
            return refuse(consumer, message, _describe(exc))

    return task_message_handler


class MessageGuardStep(bootsteps.Step):
    """Puts :func:`refuse` behind the consumer's handlers for undecodable, unknown and invalid messages."""

    label = "hypha message guard"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        # Set before the Tasks step starts: it hands c.on_decode_error to the task consumer.
        c.on_decode_error = lambda message, exc: refuse(c, message, f"the body cannot be decoded: {_describe(exc)}",
                                                        settle=message.ack)
        c.on_invalid_task = lambda body, message, exc: refuse(c, message, _describe(exc))
        c.on_unknown_task = lambda body, message, exc: refuse(
            c, message, "no such task is registered on this worker",
            error=NotRegistered(_headers(message).get("task")),
        )


def refuse(
    consumer: Any, message: Any, reason: str, *, error: Exception | None = None,
    settle: Callable[[], Any] | None = None,
) -> None:
    """Drop ``message`` with one log line; store a final ``FAILURE`` for the task id it names, if any."""
    headers = _headers(message)
    task_id, name = headers.get("id"), headers.get("task")
    task_id = task_id if isinstance(task_id, str) and 0 < len(task_id) <= _MAX_ID else None
    name = name if isinstance(name, str) else None
    reason = _clip(reason)
    error = error or MalformedMessage(f"malformed {name or 'task'} message: {reason}")
    log.warning("refused a malformed message %s[%s] (%s): %s", _clip(name or "?", 80), _clip(task_id or "no id", 80),
                _clip(str(getattr(message, "content_type", "") or "?"), 60), reason)
    try:
        (settle or (lambda: message.reject_log_error(log, consumer.connection_errors)))()
    except Exception as exc:  # a lost connection: the broker redelivers it, refused again
        log.warning("could not drop the malformed message %s: %s", task_id, _describe(exc))
    if task_id is not None:
        _store_failure(consumer.app, task_id, name, headers, message, error)


def _store_failure(app: Any, task_id: str, name: str | None, headers: dict[str, Any], message: Any,
                   error: Exception) -> None:
    backend = app.backend
    try:
        if backend.get_state(task_id) in states.READY_STATES:
            return  # a message cannot overwrite a task's final state (its id may be another task's)
        request = AttributeDict(
            id=task_id, name=name, chord=None, root_id=headers.get("root_id"), parent_id=headers.get("parent_id"),
            group=None, errbacks=None, correlation_id=getattr(message, "properties", {}).get("correlation_id"),
            reply_to=getattr(message, "properties", {}).get("reply_to"), ignore_result=False,
        )
        backend.mark_as_failure(task_id, error, request=request, call_errbacks=False)
    except Exception as exc:  # a result backend outage must not stop the consumer
        log.warning("could not store the failure of malformed message %s: %s", task_id, _describe(exc))


def _headers(message: Any) -> dict[str, Any]:
    headers = getattr(message, "headers", None)
    return headers if isinstance(headers, dict) else {}


def _describe(exc: BaseException) -> str:
    return _clip(f"{type(exc).__name__}: {exc}")


def _clip(text: str, limit: int = _MAX_REASON) -> str:
    """One line, at most ``limit`` characters: what a publisher puts in a message never spans log lines."""
    line = text.encode("unicode_escape", errors="replace").decode("ascii", errors="replace")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _is_task_body(payload: Any) -> bool:
    """Celery protocol 2: ``[args (list), kwargs (object), embed (object)]``."""
    return (
        isinstance(payload, (list, tuple))
        and len(payload) == 3
        and isinstance(payload[0], (list, tuple))
        and isinstance(payload[1], dict)
        and isinstance(payload[2], dict)
    )
