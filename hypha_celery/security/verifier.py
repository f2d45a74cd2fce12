"""Ed25519-signed task envelopes, the worker's side: checks, and a Redis store of seen nonces.

The nonce store (``hypha:nonce:<key_id>:<nonce>``, see :mod:`hypha_celery.keys`) holds one JSON
record per envelope: ``{"task": id, "seen": t, "delivered": bool, "done": bool}``.

* ``seen`` is when this network first recorded the envelope: the scheduler, just before it
  publishes (:func:`record_sent`, called by :func:`hypha_celery.client.submit`), or else the
  first worker it reaches. The envelope's ``expires_at`` bounds *that* moment, not the moment
  a worker finally takes the message: a task recorded in time is accepted after any backlog.
  A nonce nobody recorded before ``expires_at`` is refused as expired.
* ``done`` is set once the task's final state was stored (:meth:`Verifier.mark_finished`):
  another copy is then dropped when its result is there, and refused as a replay when the
  result is gone - replay protection does not depend on the result store.
* The record lives until ``issued_at + replay window + CLOCK_SKEW_S``, and no envelope older
  than the window (:func:`replay_window`) is accepted at all: while a copy could be accepted,
  its record exists.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nacl.exceptions
import nacl.signing
import redis

from hypha_celery.errors import ConfigError, InvalidSignature
from hypha_celery.keys import KeySchema
from hypha_celery.redis_errors import redis_errors
from hypha_celery.security.envelope import (
    CLOCK_SKEW_S,
    ENVELOPE_HEADER,
    MODEL_SHA256,
    OPTIONAL_SIGNED_FIELDS,
    SIGNED_FIELDS,
    body_digest,
    canonical,
    check_model_sha256,
    check_version,
    peer_id,
    public_key_from_id,
)

if TYPE_CHECKING:
    from hypha_celery.config.schema import WorkerConfig

__all__ = ["NonceRecord", "Verified", "Verifier", "record_sent", "replay_window"]

_REQUIRED = frozenset((*SIGNED_FIELDS, "signature"))
_ALLOWED = _REQUIRED | frozenset(OPTIONAL_SIGNED_FIELDS)


def replay_window(config: WorkerConfig) -> float:
    """Seconds after its ``issued_at`` that an envelope may still be accepted, so its nonce is kept.

    The longest validity a worker accepts (``max_envelope_age``), then as long as a copy of the
    task may come back: waiting for admission, redelivered after ``visibility_timeout``, running.
    A message that waited in a queue longer than this is refused: it can no longer be told from
    a replay.
    """
    return (config.security.max_envelope_age + config.admission.max_wait + config.visibility_timeout
            + config.hard_time_limit)


@dataclass(frozen=True)
class NonceRecord:
    """What the nonce store knows of one envelope (``seen`` is None in a record from before it was kept)."""

    task: str
    seen: float | None
    delivered: bool = True
    done: bool = False

    def dumps(self) -> str:
        return json.dumps({"task": self.task, "seen": self.seen, "delivered": self.delivered, "done": self.done},
                          separators=(",", ":"))

    @classmethod
    def loads(cls, raw: bytes) -> NonceRecord:
        """A stored record; a bare task id (what older workers stored) is a delivered record with no time."""
        text = raw.decode(errors="replace")
        try:
            data = json.loads(text)
        except ValueError:
            return cls(task=text, seen=None)
        if not isinstance(data, dict):
            return cls(task=text, seen=None)
        seen = data.get("seen")
        return cls(task=str(data.get("task")), seen=float(seen) if isinstance(seen, (int, float)) else None,
                   delivered=bool(data.get("delivered", True)), done=bool(data.get("done", False)))


def record_sent(
    client: redis.Redis, envelope: Mapping[str, Any], *, window: float, now: float | None = None,
    schema: KeySchema | None = None,
) -> bool:
    """Record a signed envelope as seen by this network now, before it is published (the scheduler's half).

    Then the envelope's expiry bounds the time until it was sent, not until a worker takes it
    from a queue. ``window`` is :func:`replay_window` of the workers' config. False when a
    record already exists (a nonce reused). Raises ``RegistryUnavailable`` when Redis is down.
    """
    now = time.time() if now is None else now
    schema = schema or KeySchema.from_env()
    record = NonceRecord(task=str(envelope["id"]), seen=now, delivered=False)
    with redis_errors("cannot record the envelope nonce"):
        return bool(client.set(schema.nonce(envelope["key_id"], str(envelope["nonce"])), record.dumps(), nx=True,
                               exat=int(float(envelope["issued_at"]) + window + CLOCK_SKEW_S) + 1))


@dataclass(frozen=True)
class Verified:
    """Who signed an envelope, whether this is the first delivery of it, and the model it pins (if any).

    ``finished``: the nonce store says a task with this envelope already reached a final state.
    """

    key_id: str
    nonce: str
    first_delivery: bool
    model_sha256: str | None = None
    finished: bool = False
    request_sha256: str | None = None  # SHA-256 of the bytes the scheduler signed: what a signed result answers


class Verifier:
    """Checks envelopes against the allowed keys; remembers nonces in Redis until they expire."""

    def __init__(
        self,
        allowed: Iterable[str],
        client: redis.Redis | None,
        *,
        max_age: float = 3600.0,
        remember_s: float = 0.0,
        schema: KeySchema | None = None,
    ) -> None:
        self.keys: dict[str, nacl.signing.VerifyKey] = {}
        for index, entry in enumerate(allowed):
            try:
                verify_key = nacl.signing.VerifyKey(public_key_from_id(entry))
            except ValueError as exc:
                raise ConfigError(f"worker.security.allowed_schedulers[{index}]", str(exc)) from None
            self.keys[peer_id(verify_key)] = verify_key
        self.redis = client
        self.max_age = max_age
        # How long past the longest validity a copy of a task may still come back (deferred for
        # admission, redelivered, queued): max_age + remember_s is the replay window.
        self.remember_s = remember_s
        self.schema = schema or KeySchema.from_env()

    def verify(
        self,
        envelope: Any,
        *,
        task_name: str,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        now: float | None = None,
    ) -> Verified:
        """Raise ``InvalidSignature`` with the reason, or return who signed it."""
        now = time.time() if now is None else now
        if envelope is None:
            raise InvalidSignature(f"task {task_name}[{task_id}] carries no signed envelope (header {ENVELOPE_HEADER!r}); "
                                   "this worker verifies signatures: sign with --key scheduler.key (`hypha-celery run`) "
                                   "or submit(..., signing_key=...), a key its allowed_schedulers lists")
        if not isinstance(envelope, dict) or not _REQUIRED <= set(envelope) <= _ALLOWED:
            raise InvalidSignature("the envelope is malformed: it must have exactly " + ", ".join((*SIGNED_FIELDS, "signature"))
                                   + " (and optionally " + ", ".join(OPTIONAL_SIGNED_FIELDS) + ")")
        try:
            check_version(envelope["v"])  # before the signature: a v1 envelope's bytes differ, say why
        except ValueError as exc:
            raise InvalidSignature(str(exc)) from None
        if not self.keys:
            raise InvalidSignature("this worker allows no scheduler keys (worker.security.allowed_schedulers is empty)")
        key_id = envelope["key_id"]
        verify_key = self.keys.get(key_id) if isinstance(key_id, str) else None
        if verify_key is None:
            raise InvalidSignature(f"key {key_id!r} is not in this worker's allowed_schedulers")
        unsigned = {name: envelope[name] for name in (*SIGNED_FIELDS, *OPTIONAL_SIGNED_FIELDS) if name in envelope}
        try:
            signature = base64.b64decode(envelope["signature"], validate=True)
            signed = canonical(unsigned)
            verify_key.verify(signed, signature)
        except (binascii.Error, ValueError, TypeError, nacl.exceptions.BadSignatureError):
            raise InvalidSignature(f"bad signature for key {key_id} (forged, or the envelope was altered)") from None
        self._check_matches(unsigned, task_name=task_name, task_id=task_id, args=args, kwargs=kwargs)
        issued, expires = unsigned["issued_at"], unsigned["expires_at"]
        numbers = all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (issued, expires))
        if not numbers or expires <= issued:
            raise InvalidSignature("the envelope's issued_at / expires_at are invalid")
        if expires - issued > self.max_age:
            raise InvalidSignature(
                f"the envelope is valid for {expires - issued:.0f}s, longer than this worker accepts ({self.max_age:.0f}s)"
            )
        if issued > now + CLOCK_SKEW_S:
            raise InvalidSignature(f"the envelope was issued {issued - now:.0f}s in the future (clock skew?)")
        window = self.max_age + self.remember_s
        if now - issued > window:
            raise InvalidSignature(
                f"the envelope was issued {now - issued:.0f}s ago, longer than this worker keeps nonces "
                f"({window:.0f}s): it cannot be told from a replay"
            )
        nonce = str(unsigned["nonce"])
        record, first = self._claim_nonce(key_id, nonce, task_id, now=now, expires=expires,
                                          keep_until=issued + window + CLOCK_SKEW_S)
        return Verified(key_id=key_id, nonce=nonce, first_delivery=first, model_sha256=unsigned.get(MODEL_SHA256),
                        finished=record.done, request_sha256=hashlib.sha256(signed).hexdigest())

    def _check_matches(
        self, unsigned: Mapping[str, Any], *, task_name: str, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        if unsigned["task"] != task_name:
            raise InvalidSignature(f"the envelope was signed for task {unsigned['task']!r}, delivered as {task_name!r}")
        if unsigned["id"] != task_id:
            raise InvalidSignature(f"the envelope was signed for task id {unsigned['id']!r}, delivered as {task_id!r}")
        if unsigned["model"] != kwargs.get("model"):
            raise InvalidSignature(f"the envelope names model {unsigned['model']!r}, the message {kwargs.get('model')!r}")
        if unsigned["requirements"] != kwargs.get("requirements"):
            raise InvalidSignature("the message's requirements differ from the signed ones")
        try:
            digest = body_digest(args, kwargs)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidSignature(f"the message's arguments have no RFC 8785 canonical form: {exc}") from None
        if unsigned["body_sha256"] != digest:
            raise InvalidSignature("the message's arguments differ from the signed ones")
        if MODEL_SHA256 in unsigned:
            try:
                check_model_sha256(unsigned[MODEL_SHA256])
            except ValueError as exc:
                raise InvalidSignature(f"the envelope's {exc}") from None
            if unsigned["model"] is None:
                raise InvalidSignature(f"the envelope's {MODEL_SHA256} pins a model, but it names none")

    def _claim_nonce(
        self, key_id: str, nonce: str, task_id: str, *, now: float, expires: float, keep_until: float
    ) -> tuple[NonceRecord, bool]:
        """The nonce's record and whether this is the first delivery to a worker; refuses reuse and expiry."""
        if self.redis is None:
            if expires < now:
                raise InvalidSignature(f"the envelope expired {now - expires:.0f}s ago")
            return NonceRecord(task=task_id, seen=now), True
        key = self.schema.nonce(key_id, nonce)
        try:
            with redis_errors("cannot check the envelope nonce"):
                if now <= expires:
                    fresh = NonceRecord(task=task_id, seen=now)
                    if self.redis.set(key, fresh.dumps(), nx=True, exat=int(keep_until) + 1):
                        return fresh, True
                raw: Any = self.redis.get(key)
        except redis.ResponseError as exc:
            raise InvalidSignature(f"the envelope's times are unusable: {exc}") from None
        if raw is None:
            raise InvalidSignature(f"the envelope expired {now - expires:.0f}s ago, before this network first saw it")
        record = NonceRecord.loads(raw)
        if record.task != task_id:
            raise InvalidSignature(f"replayed nonce: already used by task {record.task}")
        if record.seen is not None and record.seen > expires:
            raise InvalidSignature(f"the envelope expired {record.seen - expires:.0f}s before this network first saw it")
        if record.delivered:
            return record, False
        delivered = NonceRecord(task=record.task, seen=record.seen, delivered=True, done=record.done)
        with redis_errors("cannot check the envelope nonce"):
            self.redis.set(key, delivered.dumps(), xx=True, keepttl=True)
        return delivered, True

    def mark_finished(self, key_id: str, nonce: str, task_id: str) -> None:
        """Note that ``task_id`` reached a final state: a later copy of its envelope never runs it again."""
        if self.redis is None:
            return
        key = self.schema.nonce(key_id, nonce)
        with redis_errors("cannot record the finished task's nonce"):
            raw: Any = self.redis.get(key)
            if raw is None:
                return
            record = NonceRecord.loads(raw)
            if record.task == task_id and not record.done:
                done = NonceRecord(task=record.task, seen=record.seen, delivered=True, done=True)
                self.redis.set(key, done.dumps(), xx=True, keepttl=True)
