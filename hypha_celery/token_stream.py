"""A generation's tokens as a Redis Stream: cheaper than polling ``PROGRESS``, and a record to continue from.

Why a stream and not the task's ``PROGRESS`` state: a ``PROGRESS`` write replaces the whole text so
far (bytes grow with the square of the length), and a client learns of it only by reading the state
again and again. A stream appends only what is new, and a reader's ``XREAD BLOCK`` returns the moment
an entry lands, so neither side spends a command when nothing happened. ``PROGRESS`` stays (Flower
shows it); the stream is what clients read (:func:`hypha_celery.client.stream`).

Each generation (``hypha.generate``) writes, in the result backend's Redis, under
:meth:`~hypha_celery.keys.KeySchema.token_stream` (``hypha:task:<task_id>:tokens``):

* one entry per report of the executor (at most every ``STREAM_INTERVAL_S`` of
  :mod:`hypha_celery.tasks.generate`), with the fields ``row`` (the prompt's row in the task: 0, as a
  task holds one prompt), ``start`` (the row's number of its first token here), ``ids`` (the token ids,
  comma-separated), ``offset`` (characters of the row's text before this piece), ``text`` (the new
  text: joined in order, the pieces are the final text) and ``t`` (unix seconds when the executor saw
  the newest of these tokens);
* then one end entry: ``end`` (the task's status, ``SUCCESS`` or ``FAILURE``), and for a failure
  ``error`` (the class name in :mod:`hypha_celery.errors`) and ``message``.

The ids and their numbers make the stream the record that a generation can be continued from on another
worker; ``offset`` lets a reader that sees a piece twice (the task ran again after its worker died)
keep each character once. Entries are trimmed to ``MAXLEN ~ [worker.generation] stream_maxlen`` (Redis
trims whole nodes, so a stream may hold a few more); the key expires with the task's result
(Celery's ``result_expires``, set when the first entry is written and again with the end).
Each flush is one pipelined round trip (its ``XADD`` and, first and last, an ``EXPIRE``).

The worker gets a :class:`TokenStreams` (its Redis client, the key names, the bound) from its node
context and opens a :class:`TokenStreamWriter` per task; :func:`read` is the reading side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from hypha_celery import errors
from hypha_celery.keys import KeySchema

__all__ = ["DEFAULT_MAXLEN", "End", "TokenStreamWriter", "TokenStreams", "Tokens", "error_of", "read"]

log = logging.getLogger(__name__)

DEFAULT_MAXLEN = 4096
SUCCESS, FAILURE = "SUCCESS", "FAILURE"
# The classes an end entry may name that a reader rebuilds: those built from one message string.
_ERRORS: dict[str, type[errors.HyphaError]] = {
    name: cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type)
    and issubclass(cls, errors.HyphaError)
    and not issubclass(cls, (errors.ConfigError, errors.ControlFlow))
}


@dataclass(frozen=True)
class Tokens:
    """One entry of new tokens: row ``row``'s tokens number ``start`` on (``ids``), its text from ``offset``."""

    row: int
    start: int
    ids: list[int]
    offset: int
    text: str
    at: float
    id: str = ""  # the stream entry's id


@dataclass(frozen=True)
class End:
    """The last entry: the task's ``status``; for a failure the error's class name and message."""

    status: str
    error: str = ""
    message: str = ""
    at: float = 0.0
    id: str = ""
    text: str = ""  # the final text, where the end was read from the task's result (no end entry was written)


def encode_tokens(entry: Tokens) -> dict[str, str]:
    """The stream fields of ``entry`` (every value a string, readable by any Redis client)."""
    return {"row": str(entry.row), "start": str(entry.start), "ids": ",".join(map(str, entry.ids)),
            "offset": str(entry.offset), "text": entry.text, "t": f"{entry.at:.6f}"}


def encode_end(entry: End) -> dict[str, str]:
    fields = {"end": entry.status, "t": f"{entry.at:.6f}"}
    if entry.error:
        fields.update(error=entry.error, message=entry.message)
    return fields


def decode(entry_id: str | bytes, fields: dict[Any, Any]) -> Tokens | End:
    """An entry as :func:`read` returns it, from the fields Redis gives back (bytes or str)."""
    text = {_str(key): _str(value) for key, value in fields.items()}
    ident = _str(entry_id)
    if "end" in text:
        return End(status=text["end"], error=text.get("error", ""), message=text.get("message", ""),
                   at=float(text.get("t", 0) or 0), id=ident)
    ids = text.get("ids", "")
    return Tokens(row=int(text.get("row", 0)), start=int(text.get("start", 0)),
                  ids=[int(i) for i in ids.split(",")] if ids else [], offset=int(text.get("offset", 0)),
                  text=text.get("text", ""), at=float(text.get("t", 0) or 0), id=ident)


def error_of(end: End) -> errors.HyphaError:
    """The named error an end entry reports (``ExecutionError`` naming the class, for one hypha does not rebuild)."""
    cls = _ERRORS.get(end.error)
    if cls is not None:
        return cls(end.message)
    return errors.ExecutionError(f"{end.error or end.status}: {end.message}")


@dataclass
class _Row:
    text: str = ""  # what the stream holds of the row's text
    tokens: int = 0  # how many of the row's token ids it holds
    diverged: bool = False


@dataclass
class TokenStreamWriter:
    """Appends one task's tokens to its stream; Redis errors are logged, never raised (the result still goes)."""

    client: redis.Redis
    key: str
    maxlen: int = DEFAULT_MAXLEN
    expires: int | None = None  # seconds; None or 0: the result never expires, so neither does the stream
    pending: list[dict[str, str]] = field(default_factory=list)
    rows: dict[int, _Row] = field(default_factory=dict)
    flushes: int = 0
    ended: bool = False
    broken: bool = False  # a write failed: the rest of the run writes only its end (a Redis down costs one timeout)

    def add(self, row: int, text: str, ids: Sequence[int], start: int, at: float | None = None) -> bool:
        """Note a report: row ``row``'s visible ``text`` so far and its token ``ids`` from number ``start``.

        Buffers an entry of what the stream does not hold yet (nothing, when a repeat brings nothing new);
        returns whether it did. ``flush`` writes it.
        """
        state = self.rows.setdefault(row, _Row())
        skip = max(0, state.tokens - start)
        new_ids = list(ids[skip:])
        piece, offset = "", len(state.text)
        if text.startswith(state.text):
            piece = text[len(state.text):]
        elif not state.text.startswith(text) and not state.diverged:  # a run again that sampled other tokens
            state.diverged = True
            log.warning("stream %s: row %d's text no longer extends what the stream holds; its text stops here",
                        self.key, row)
        if state.diverged:
            piece = ""
        if not new_ids and not piece:
            return False
        self.pending.append(encode_tokens(Tokens(row=row, start=start + skip, ids=new_ids, offset=offset, text=piece,
                                                 at=time.time() if at is None else at)))
        state.text += piece
        state.tokens = max(state.tokens, start + len(ids))
        return True

    def flush(self) -> None:
        """Write the buffered entries in one round trip (and the key's expiry, with the first)."""
        if self.broken:
            self.pending = []
        elif self.pending:
            self._write([])

    def end(self, status: str, error: BaseException | None = None) -> None:
        """Write the buffered entries and the end entry (the task's ``status``; ``error`` when it failed)."""
        if self.ended:
            return
        self.ended = True
        name = "" if error is None else type(error).__name__
        message = "" if error is None else str(error)
        self._write([encode_end(End(status=status, error=name, message=message, at=time.time()))])

    def _write(self, tail: list[dict[str, str]]) -> None:
        entries, self.pending = self.pending + tail, []
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for fields in entries:
                    pipe.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                if self.expires and (self.flushes == 0 or tail):
                    pipe.expire(self.key, self.expires)
                pipe.execute()
        except redis.RedisError as exc:  # advisory: the task's result still carries the whole text
            self.broken = True
            log.warning("stream %s: could not write %d entries (%s); it gets only its end now", self.key,
                        len(entries), exc)
        self.flushes += 1


@dataclass(frozen=True)
class TokenStreams:
    """Where a worker writes token streams: its client of the result backend's Redis, the key names, the bound."""

    client: redis.Redis
    schema: KeySchema = field(default_factory=KeySchema.from_env)
    maxlen: int = DEFAULT_MAXLEN

    def writer(self, task_id: str, expires: int | float | None) -> TokenStreamWriter:
        """The writer of task ``task_id``'s stream, its key kept ``expires`` seconds (the result's expiry)."""
        return TokenStreamWriter(self.client, self.schema.token_stream(task_id), self.maxlen,
                                 int(expires) if expires else None)

    def close(self) -> None:
        self.client.close()


def read(
    client: redis.Redis,
    key: str,
    *,
    timeout: float,
    block_s: float = 2.0,
    after: str = "0",
    idle: Callable[[], End | None] | None = None,
) -> Iterator[Tokens | End]:
    """Every entry of the stream at ``key`` after ``after`` ("0": from its start), as it lands, up to its end entry.

    Each wait is one ``XREAD BLOCK`` that returns when an entry lands; a wait that ends with nothing
    (every ``block_s``) asks ``idle`` once, which may end the reading with an :class:`End` (the task
    finished without a stream, e.g. on a worker that writes none). ``TimeoutError`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = after
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no end of stream {key} within {timeout:g} s")
        reply: Any = client.xread({key: last}, block=max(1, int(min(block_s, left) * 1000)))
        if not reply:
            ended = idle() if idle is not None else None
            if ended is not None:
                yield ended
                return
            continue
        for _, entries in reply:
            for entry_id, fields in entries:
                last = _str(entry_id)
                entry = decode(entry_id, fields)
                yield entry
                if isinstance(entry, End):
                    return


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
