"""The submitted generations of one executor, by id: where each tagged reply goes, and who hears of a loss.

Pure bookkeeping, no socket and no process, so the routing rules are unit-tested alone:
a :class:`~hypha_celery.work.Streamed` report goes to its generation's handler and keeps it
registered; its final reply (a result or an error) goes there and unregisters it; a reply
for an id nobody waits for (a generation the worker gave up on) is dropped; when the executor
is lost, every registered handler gets the error once, and later submissions are refused with it.
:class:`~hypha_celery.executor.process.ExecutorProcess` owns one and feeds it from its reader thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Tags"]

log = logging.getLogger(__name__)

R = TypeVar("R")
E = TypeVar("E", bound=BaseException)


class Tags(Generic[R, E]):
    """Handlers by id. Thread-safe; handlers are called outside the lock, in the caller's thread."""

    def __init__(self, is_final: Callable[[R], bool]) -> None:
        self._is_final = is_final
        self._handlers: dict[int, Callable[[R | E], None]] = {}
        self._lock = threading.Lock()
        self.lost: E | None = None
        self.lost_with = 0  # how many were in flight when it was lost

    def __len__(self) -> int:
        with self._lock:
            return len(self._handlers)

    def add(self, id: int, handler: Callable[[R | E], None]) -> None:
        """Register ``handler`` for ``id``; the loss's error if the executor is already lost."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            self._handlers[id] = handler

    def discard(self, id: int) -> None:
        with self._lock:
            self._handlers.pop(id, None)

    def route(self, id: int, reply: R) -> bool:
        """Hand ``reply`` to ``id``'s handler; False when nobody waits for it."""
        with self._lock:
            handler = self._handlers.pop(id, None) if self._is_final(reply) else self._handlers.get(id)
        if handler is None:
            return False
        self._call(handler, reply)
        return True

    def lose(self, error: E) -> int:
        """The executor is gone: every handler gets ``error``; returns how many there were."""
        with self._lock:
            self.lost = error
            handlers, self._handlers = list(self._handlers.values()), {}
            self.lost_with = len(handlers)
        for handler in handlers:
            self._call(handler, error)
        return len(handlers)

    @staticmethod
    def _call(handler: Callable[[R | E], None], reply: R | E) -> None:
        try:
            handler(reply)
        except Exception:  # one handler's bug must not stop the reader: the other generations' replies still come
            log.exception("a generation's reply handler failed")
