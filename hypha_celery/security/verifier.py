"""Ed25519-signed task envelopes, the worker's side: checks, and a Redis store of seen nonces."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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

__all__ = ["Verified", "Verifier"]

_REQUIRED = frozenset((*SIGNED_FIELDS, "signature"))
_ALLOWED = _REQUIRED | frozenset(OPTIONAL_SIGNED_FIELDS)


@dataclass(frozen=True)
class Verified:
    """Who signed an envelope, whether this is the first delivery of it, and the model it pins (if any)."""

    key_id: str
    nonce: str
    first_delivery: bool
    model_sha256: str | None = None


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
        # How long a nonce is remembered past its first delivery: as long as a copy of the task may
        # still come back (deferred for admission, redelivered) - not just until the envelope expires.
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
            raise InvalidSignature(f"task {task_name}[{task_id}] carries no signed envelope (header {ENVELOPE_HEADER!r})")
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
            verify_key.verify(canonical(unsigned), signature)
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
        first = self._claim_nonce(key_id, str(unsigned["nonce"]), task_id, max(expires, now + self.remember_s))
        if first and expires < now:
            raise InvalidSignature(f"the envelope expired {now - expires:.0f}s ago")
        return Verified(key_id=key_id, nonce=str(unsigned["nonce"]), first_delivery=first,
                        model_sha256=unsigned.get(MODEL_SHA256))

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

    def _claim_nonce(self, key_id: str, nonce: str, task_id: str, expires: float) -> bool:
        """True on the first delivery of this envelope; a redelivery of the same task is allowed."""
        if self.redis is None:
            return True
        key = self.schema.nonce(key_id, nonce)
        try:
            with redis_errors("cannot check the envelope nonce"):
                claimed = self.redis.set(key, task_id, nx=True, exat=int(expires + CLOCK_SKEW_S) + 1)
                if claimed:
                    return True
                holder: Any = self.redis.get(key)
        except redis.ResponseError as exc:
            raise InvalidSignature(f"the envelope's times are unusable: {exc}") from None
        if holder is not None and holder.decode() != task_id:
            raise InvalidSignature(f"replayed nonce: already used by task {holder.decode()}")
        return False
