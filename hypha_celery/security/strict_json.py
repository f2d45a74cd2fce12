"""One JSON meaning: a message whose JSON names an object key twice is refused, never read one way.

Python's ``json`` (and kombu's reader on it) keeps the last of two equal keys; readers in other
languages may keep the first. A scheduler reading its own message the other way would sign and
log one value while the worker runs another. So duplicates are found where the raw text still
shows them:

* the task **body** by the message strategy (:func:`duplicate_key` on ``message.body``):
  refused as ``MalformedMessage``;
* the transport message around it (Celery's **headers**, the signed envelope among them) by hypha's
  Redis transport as it takes a message from its queue (:func:`mark_duplicates`): kombu's reader
  would drop the evidence, so the transport records what it found in the header
  :data:`DUPLICATE_HEADER`, and the strategy refuses the message: ``InvalidSignature`` when the
  duplicate is inside the ``hypha_envelope`` header, else ``MalformedMessage``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["DUPLICATE_HEADER", "DuplicateKey", "duplicate_key", "mark_duplicates", "response_checker"]

DUPLICATE_HEADER = "hypha_duplicate_key"  # set by the transport: "<where>: <key>"; where is "hypha_envelope" or "message"
_ENVELOPE = "hypha_envelope"


class DuplicateKey(ValueError):
    """A JSON object names ``key`` twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate object key {key!r}")
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook`` that refuses an object naming a key twice."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise DuplicateKey(_first_repeated(pairs))
    return found


def _first_repeated(pairs: list[tuple[str, Any]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return ""


def duplicate_key(raw: str | bytes | bytearray | memoryview) -> str | None:
    """The first key some object in the JSON text ``raw`` repeats, else None (text that is no JSON: None)."""
    try:
        json.loads(bytes(raw) if isinstance(raw, memoryview) else raw, object_pairs_hook=_unique)
    except DuplicateKey as exc:
        return exc.key
    except (TypeError, ValueError):
        return None
    return None


def mark_duplicates(item: Any) -> Any:
    """A transport message (kombu's JSON on a Redis list) with :data:`DUPLICATE_HEADER` set if it repeats a key.

    Returned unchanged (the same object) when it repeats none, or is no JSON object with headers.
    """
    if not isinstance(item, (bytes, str)):
        return item
    repeated: dict[int, str] = {}

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found = dict(pairs)
        if len(found) != len(pairs):
            repeated[id(found)] = _first_repeated(pairs)
        return found

    try:
        message = json.loads(item, object_pairs_hook=hook)
    except (TypeError, ValueError):
        return item
    headers = message.get("headers") if isinstance(message, dict) else None
    if not repeated or not isinstance(headers, dict):
        return item
    envelope = headers.get(_ENVELOPE)
    inside = [repeated[id(obj)] for obj in _objects(envelope) if id(obj) in repeated]
    where, key = (_ENVELOPE, inside[0]) if inside else ("message", next(iter(repeated.values())))
    headers[DUPLICATE_HEADER] = f"{where}: {key}"
    text = json.dumps(message)
    return text.encode() if isinstance(item, bytes) else text


def _objects(value: Any) -> list[dict[str, Any]]:
    """Every JSON object within ``value``, itself included."""
    found: list[dict[str, Any]] = []
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            found.append(current)
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    return found


def response_checker(previous: Callable[..., Any] | None, *, pair: bool) -> Callable[..., Any]:
    """A redis-py response callback for ``BRPOP`` (``pair``: ``[queue, message]``) or ``RPOP`` that marks duplicates."""

    def callback(response: Any, **options: Any) -> Any:
        value = previous(response, **options) if previous is not None else response
        if value is None:
            return value
        if pair and isinstance(value, (list, tuple)) and len(value) == 2:
            marked = (value[0], mark_duplicates(value[1]))
            return marked if isinstance(value, tuple) else list(marked)
        if isinstance(value, list):
            return [mark_duplicates(entry) for entry in value]
        return mark_duplicates(value)

    return callback
