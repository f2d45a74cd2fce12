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
  The first entry a run writes also names its worker (``worker``) and when the task's time budget
  started (``since``: unix seconds of the first run's admission);
* then one end entry: ``end`` (the task's status, ``SUCCESS`` or ``FAILURE``), and for a failure
  ``error`` (the class name in :mod:`hypha_celery.errors`) and ``message``.

The ids and their numbers make the stream the record that a generation is continued from on another
worker when its own dies (:func:`read_record`, :mod:`hypha_celery.stages.continuation`); a seeded
sampled generation also keeps its generator's state after the streamed tokens beside it
(:meth:`~hypha_celery.keys.KeySchema.token_rng`, ``<tokens>:<state>``, rewritten by each write after
the ``XADD``, so a state never names tokens the stream lacks). ``offset`` lets a reader that sees a
piece twice keep each character once.

A worker with an identity (``sign_results``) signs what it writes: each entry carries ``sig``
(Ed25519, base64, over the RFC 8785 form of ``{"v": 1, "task_id": ..., "entry": <its other
fields>}``), a run's first entry names its ``peer`` (the signing key's peer id), and the generator
state is ``<tokens>:<sig>:<state>`` (the signature over ``{"v": 1, "task_id": ..., "rng_tokens":
<tokens>, "rng": <state>}``). A worker that continues a task (and signs its own result) continues
only from entries signed by the identity their worker registered (``hypha:peers``), so nobody
who can merely write the result backend can put tokens into a signed result (:func:`read_record`).

Entries are trimmed to ``MAXLEN ~ [worker.generation] stream_maxlen`` (Redis trims whole nodes, so
a stream may hold a few more); the key expires with the task's result (Celery's ``result_expires``,
set when the first entry is written and again with the end). Each flush is one pipelined round trip
(its ``XADD`` and, first and last, an ``EXPIRE``).

The worker gets a :class:`TokenStreams` (its Redis client, the key names, the bound) from its node
context and opens a :class:`TokenStreamWriter` per task; :func:`read` is the reading side.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nacl.exceptions
import nacl.signing
import redis

from hypha_celery import errors
from hypha_celery.keys import KeySchema
from hypha_celery.security.envelope import canonical, public_key_from_id

__all__ = ["DEFAULT_MAXLEN", "End", "Record", "TokenStreamWriter", "TokenStreams", "Tokens", "error_of", "read",
           "read_record", "signed_by"]

log = logging.getLogger(__name__)

DEFAULT_MAXLEN = 4096
SUCCESS, FAILURE = "SUCCESS", "FAILURE"


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
    worker: str = ""  # on the first entry of each run: the worker that wrote it
    since: float = 0.0  # and when the task's time budget started
    peer: str = ""  # and the peer id of the identity that signs the run's entries ("" when unsigned)
    raw: dict[str, str] = field(default_factory=dict, compare=False, repr=False)  # the fields as stored (signed)


@dataclass(frozen=True)
class End:
    """The last entry: the task's ``status``; for a failure the error's class name and message."""

    status: str
    error: str = ""
    message: str = ""
    at: float = 0.0
    id: str = ""
    text: str = ""  # the final text, where the end was read from the task's result (no end entry was written)
    raw: dict[str, str] = field(default_factory=dict, compare=False, repr=False)  # the fields as stored (signed)


def encode_tokens(entry: Tokens) -> dict[str, str]:
    """The stream fields of ``entry`` (every value a string, readable by any Redis client)."""
    fields = {"row": str(entry.row), "start": str(entry.start), "ids": ",".join(map(str, entry.ids)),
              "offset": str(entry.offset), "text": entry.text, "t": f"{entry.at:.6f}"}
    if entry.worker:
        fields.update(worker=entry.worker, since=f"{entry.since:.6f}")
    if entry.peer:
        fields["peer"] = entry.peer
    return fields


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
                   at=float(text.get("t", 0) or 0), id=ident, raw=text)
    ids = text.get("ids", "")
    return Tokens(row=int(text.get("row", 0)), start=int(text.get("start", 0)),
                  ids=[int(i) for i in ids.split(",")] if ids else [], offset=int(text.get("offset", 0)),
                  text=text.get("text", ""), at=float(text.get("t", 0) or 0), id=ident,
                  worker=text.get("worker", ""), since=float(text.get("since", 0) or 0), peer=text.get("peer", ""),
                  raw=text)


def _signed_bytes(task_id: str, fields: Mapping[str, str]) -> bytes:
    return canonical({"v": 1, "task_id": task_id, "entry": {k: v for k, v in fields.items() if k != "sig"}})


def _rng_bytes(task_id: str, tokens: int, state: str) -> bytes:
    return canonical({"v": 1, "task_id": task_id, "rng_tokens": tokens, "rng": state})


def _sign(identity: nacl.signing.SigningKey, message: bytes) -> str:
    return base64.b64encode(identity.sign(message).signature).decode()


def _verifies(peer: str, message: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``peer``'s Ed25519 signature over ``message``."""
    try:
        key = nacl.signing.VerifyKey(public_key_from_id(peer))
        key.verify(message, base64.b64decode(signature, validate=True))
    except (ValueError, TypeError, binascii.Error, nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError):
        return False
    return True


def signed_by(peer: str, task_id: str, fields: Mapping[str, str]) -> bool:
    """Whether the entry ``fields`` (as stored: strings) of task ``task_id``'s stream carry ``peer``'s signature."""
    signature = fields.get("sig")
    if not signature or not peer:
        return False
    try:
        message = _signed_bytes(task_id, fields)
    except (TypeError, ValueError):
        return False
    return _verifies(peer, message, signature)


def error_of(end: End) -> errors.HyphaError:
    """The named error an end entry reports (``ExecutionError`` naming the class, for one hypha does not rebuild)."""
    return errors.rebuilt(end.error, end.message) or errors.ExecutionError(f"{end.error or end.status}: {end.message}")


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
    rng_key: str | None = None  # where a seeded sampled row's generator state goes (row 0's)
    pending: list[dict[str, str]] = field(default_factory=list)
    rows: dict[int, _Row] = field(default_factory=dict)
    flushes: int = 0
    ended: bool = False
    broken: bool = False  # a write failed: the rest of the run writes only its end (a Redis down costs one timeout)
    worker: str = ""  # named, with ``since``, on this run's first entry (:meth:`begin`)
    since: float = 0.0
    rng: str | None = None  # "<tokens>:<sig>:<state>" to write with the next flush
    identity: nacl.signing.SigningKey | None = None  # signs every entry (None: unsigned)
    task_id: str = ""
    peer: str = ""  # the identity's peer id, named on this run's first entry

    def begin(self, worker: str, since: float) -> None:
        """This run's first entry names ``worker`` and ``since`` (when the task's time budget started)."""
        self.worker, self.since = worker, since

    def resume(self, row: int, text: str, tokens: int) -> None:
        """The stream already holds row ``row``'s first ``tokens`` token ids and ``text`` (an earlier run's):
        this run's reports add only what comes after them."""
        self.rows[row] = _Row(text=text, tokens=tokens)

    def add(self, row: int, text: str, ids: Sequence[int], start: int, at: float | None = None,
            rng: str | None = None) -> bool:
        """Note a report: row ``row``'s visible ``text`` so far and its token ``ids`` from number ``start``
        (``rng``: the row's generator state after them).

        Buffers an entry of what the stream does not hold yet (nothing, when a repeat brings nothing new);
        returns whether it did. ``flush`` writes it.
        """
        if rng is not None and row == 0 and self.rng_key is not None:
            count = start + len(ids)
            signature = _sign(self.identity, _rng_bytes(self.task_id, count, rng)) if self.identity is not None else ""
            self.rng = f"{count}:{signature}:{rng}"
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
        self.pending.append(self._signed(encode_tokens(Tokens(
            row=row, start=start + skip, ids=new_ids, offset=offset, text=piece, at=time.time() if at is None else at,
            worker=self.worker, since=self.since, peer=self.peer if self.worker else ""))))
        self.worker = ""  # named once, on the run's first entry
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
        fields = encode_end(End(status=status, error=name, message=message, at=time.time()))
        if self.worker:  # the run wrote no tokens: its end names who signs it
            fields["worker"] = self.worker
            if self.peer:
                fields["peer"] = self.peer
        self._write([self._signed(fields)])

    def _signed(self, fields: dict[str, str]) -> dict[str, str]:
        """``fields`` with this worker's signature (``sig``), when it has an identity."""
        if self.identity is not None:
            try:
                fields["sig"] = _sign(self.identity, _signed_bytes(self.task_id, fields))
            except (TypeError, ValueError) as exc:  # text with no RFC 8785 form: left unsigned (never continued from)
                log.warning("stream %s: an entry cannot be signed (%s); it goes unsigned", self.key, exc)
        return fields

    def _write(self, tail: list[dict[str, str]]) -> None:
        entries, self.pending = self.pending + tail, []
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for fields in entries:
                    pipe.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                if self.rng is not None and self.rng_key is not None:  # after the XADD: it never names missing tokens
                    pipe.set(self.rng_key, self.rng, ex=self.expires or None)
                    self.rng = None
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
    identity: nacl.signing.SigningKey | None = None  # the worker's, which signs what it writes
    peer: str = ""  # its peer id

    def writer(self, task_id: str, expires: int | float | None) -> TokenStreamWriter:
        """The writer of task ``task_id``'s stream, its key kept ``expires`` seconds (the result's expiry)."""
        return TokenStreamWriter(self.client, self.schema.token_stream(task_id), self.maxlen,
                                 int(expires) if expires else None, self.schema.token_rng(task_id),
                                 identity=self.identity, task_id=task_id, peer=self.peer)

    def record(self, task_id: str, max_tokens: int, trusted: Callable[[str, str], bool] | None = None
               ) -> Record | None:
        """What task ``task_id``'s stream holds of an earlier run (:func:`read_record`)."""
        return read_record(self.client, self.schema.token_stream(task_id), self.schema.token_rng(task_id),
                           max_tokens=max_tokens, task_id=task_id, trusted=trusted)

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class Record:
    """What a task's stream holds of its earlier runs: what a copy of the task continues from.

    ``ids``: row 0's token ids from its first, without a gap; ``text``: the row's text a reader has
    been given; ``rng``: the generator state after ``rng_tokens`` of the ids ("" when none was kept);
    ``workers``: the runs' workers, in order; ``since``: when the first run was admitted (0: unknown);
    ``refused``: why the ids cannot be continued from (a gap, an entry that does not parse, more tokens
    than the task may produce, an end entry); the ids are then empty, ``text`` and ``held`` still say
    what a reader has seen.
    """

    ids: list[int]
    text: str
    held: int  # token ids the stream holds for row 0 (what a writer must not append again)
    rng: str = ""
    rng_tokens: int = -1
    workers: tuple[str, ...] = ()
    since: float = 0.0
    refused: str = ""


def read_record(client: redis.Redis, key: str, rng_key: str, *, max_tokens: int, task_id: str = "",
                trusted: Callable[[str, str], bool] | None = None) -> Record | None:
    """Task ``task_id``'s stream at ``key`` (and the generator state at ``rng_key``) as a :class:`Record`, in one
    round trip; None when there is no stream. Every entry is checked: the stream is written by other workers.

    ``trusted(worker, peer)``: whether ``peer`` is ``worker``'s registered identity. With it, each run's first
    entry must name a trusted peer and every entry (and the generator state) carry that peer's signature, or
    the record is refused from there on; without it, signatures are not read.
    """
    with client.pipeline(transaction=False) as pipe:
        pipe.xrange(key, count=DEFAULT_MAXLEN * 2)
        pipe.get(rng_key)
        raw_entries, raw_rng = pipe.execute()
    if not raw_entries:
        return None
    ids: list[int] = []
    text, refused, since, signer = "", "", 0.0, ""
    workers: list[str] = []
    for entry_id, raw in raw_entries:
        try:
            fields = {_str(name): _str(value) for name, value in raw.items()}
            entry = decode(entry_id, fields)
        except (ValueError, UnicodeDecodeError):
            refused = refused or f"entry {_str(entry_id)} does not parse"
            break
        if trusted is not None:
            if isinstance(entry, Tokens) and entry.worker:
                signer = entry.peer if entry.peer and _trusts(trusted, entry.worker, entry.peer) else ""
            if not signer or not signed_by(signer, task_id, fields):
                refused = refused or (f"entry {entry.id} is not signed by its worker's registered identity")
                break
        if isinstance(entry, End):
            refused = refused or f"the stream already ended ({entry.status})"
            break
        if entry.row != 0 or entry.start < 0 or entry.offset < 0 or any(i < 0 for i in entry.ids):
            refused = refused or f"entry {entry.id} is not one of this task's"
            break
        if entry.worker and (not workers or workers[-1] != entry.worker):
            workers.append(entry.worker[:256])
        if entry.since > 0 and (since == 0 or entry.since < since):
            since = entry.since
        if entry.start > len(ids):
            refused = refused or f"its tokens {len(ids)} to {entry.start - 1} are missing (trimmed or lost)"
            break
        ids.extend(entry.ids[len(ids) - entry.start:])
        if entry.offset <= len(text) < entry.offset + len(entry.text):
            text += entry.text[len(text) - entry.offset:]
        if len(ids) > max_tokens:
            refused = refused or f"it holds more than the task's {max_tokens} new tokens"
            break
    rng, rng_tokens = "", -1
    if raw_rng and len(raw_rng) <= 64 * 1024:
        count, signature, state = [*_str(raw_rng).split(":", 2), "", ""][:3]
        if count.isdigit() and int(count) <= len(ids) and (
                trusted is None or (signer and _verifies(signer, _rng_bytes(task_id, int(count), state), signature))):
            rng, rng_tokens = state, int(count)
    return Record(ids=[] if refused else ids, text=text, held=len(ids), rng=rng, rng_tokens=rng_tokens,
                  workers=tuple(workers), since=min(since, time.time()), refused=refused)


def _trusts(trusted: Callable[[str, str], bool], worker: str, peer: str) -> bool:
    try:
        return bool(trusted(worker, peer))
    except Exception as exc:  # the registry cannot say: nothing is trusted on faith
        log.warning("cannot check %s's identity (%s): its tokens are not continued from", worker, exc)
        return False


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
