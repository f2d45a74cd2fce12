"""Ed25519-signed task envelopes: schedulers sign, workers verify before anything runs.

Celery's ``auth`` serializer signs the message body only, with no expiry or
nonce; a captured message can be replayed forever and re-addressed to another
task id. Here a scheduler signs a *canonical envelope* that names the task,
its id, a hash of its arguments, its model and requirements, when it was
issued, when it expires, and a random nonce. The envelope travels in the
message header ``hypha_envelope``::

    {"v": 1, "key_id": "12D3KooW...", "task": "hypha.infer", "id": "<task id>",
     "model": "mlp", "requirements": {...}, "body_sha256": "<hex>",
     "issued_at": 1700000000.0, "expires_at": 1700000300.0, "nonce": "<hex>",
     "signature": "<base64 Ed25519 signature of the canonical JSON of the other fields>"}

Key ids are libp2p peer ids (``12D3KooW...``): the identity multihash of the
Ed25519 public key, so a peer id *is* the public key and ``allowed_schedulers``
can list peer ids (or raw public keys in base64 or hex).

Using it with plain Celery::

    key = load_signing_key("scheduler.key")
    task.apply_async(kwargs=kw, **signed_options(key, "hypha.infer", kwargs=kw))
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import base58
import nacl.exceptions
import nacl.signing
import redis

from hypha_celery import keys
from hypha_celery.errors import ConfigError, InvalidSignature, RegistryUnavailable

__all__ = [
    "ENVELOPE_HEADER",
    "Verified",
    "Verifier",
    "canonical",
    "generate_key",
    "load_signing_key",
    "peer_id",
    "public_key_from_id",
    "sign_envelope",
    "signed_options",
]

ENVELOPE_HEADER = "hypha_envelope"
DEFAULT_TTL_S = 300.0
CLOCK_SKEW_S = 60.0
_PEER_PREFIX = b"\x00\x24\x08\x01\x12\x20"  # identity multihash, 36 bytes of protobuf PublicKey{Ed25519}
_FIELDS = ("v", "key_id", "task", "id", "model", "requirements", "body_sha256", "issued_at", "expires_at", "nonce")


def canonical(value: Any) -> bytes:
    """The one byte string a JSON value signs as: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def body_digest(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({"args": list(args), "kwargs": dict(kwargs)})).hexdigest()


def peer_id(verify_key: nacl.signing.VerifyKey) -> str:
    """The libp2p peer id of an Ed25519 public key."""
    return base58.b58encode(_PEER_PREFIX + bytes(verify_key)).decode()


def public_key_from_id(text: str) -> bytes:
    """Public key bytes from a peer id, or from a base64 / hex encoded 32-byte key."""
    text = text.strip()
    if text.startswith("12D3KooW"):
        try:
            raw = base58.b58decode(text)
        except ValueError:
            raw = b""
        if len(raw) == 38 and raw.startswith(_PEER_PREFIX):
            return raw[len(_PEER_PREFIX):]
        raise ValueError(f"{text!r} is not an Ed25519 libp2p peer id")
    for decode in (bytes.fromhex, lambda s: base64.b64decode(s, validate=True)):
        try:
            raw = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(raw) == 32:
            return raw
    raise ValueError(f"{text!r} is neither a peer id (12D3KooW...) nor a 32-byte public key in base64 or hex")


def generate_key(path: str | os.PathLike[str]) -> nacl.signing.SigningKey:
    """Write a new private key (base64 seed) to ``path`` with mode 0600; refuse to overwrite."""
    key = nacl.signing.SigningKey.generate()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(bytes(key)).decode() + "\n")
    return key


def load_signing_key(path: str | os.PathLike[str]) -> nacl.signing.SigningKey:
    """Read a key written by :func:`generate_key`; a world-readable key file is refused."""
    file = Path(path)
    try:
        mode = file.stat().st_mode
        text = file.read_text().strip()
    except OSError as exc:
        raise ConfigError("signing_key", f"cannot read {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError("signing_key", f"{path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it")
    try:
        seed = base64.b64decode(text, validate=True)
        return nacl.signing.SigningKey(seed)
    except (binascii.Error, ValueError, nacl.exceptions.CryptoError):
        raise ConfigError("signing_key", f"{path} does not hold a base64 Ed25519 seed") from None


def sign_envelope(
    key: nacl.signing.SigningKey,
    *,
    task_name: str,
    task_id: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    ttl: float = DEFAULT_TTL_S,
    now: float | None = None,
) -> dict[str, Any]:
    """The signed envelope for one task message."""
    kwargs = dict(kwargs or {})
    issued = time.time() if now is None else now
    envelope: dict[str, Any] = {
        "v": 1,
        "key_id": peer_id(key.verify_key),
        "task": task_name,
        "id": task_id,
        "model": kwargs.get("model"),
        "requirements": kwargs.get("requirements"),
        "body_sha256": body_digest(args, kwargs),
        "issued_at": issued,
        "expires_at": issued + ttl,
        "nonce": secrets.token_hex(16),
    }
    envelope["signature"] = base64.b64encode(key.sign(canonical(envelope)).signature).decode()
    return envelope


def signed_options(
    key: nacl.signing.SigningKey,
    task_name: str,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    task_id: str | None = None,
    ttl: float = DEFAULT_TTL_S,
) -> dict[str, Any]:
    """``task_id`` and ``headers`` to pass to ``apply_async`` / ``send_task`` for a signed message."""
    task_id = task_id or str(uuid.uuid4())
    envelope = sign_envelope(key, task_name=task_name, task_id=task_id, args=args, kwargs=kwargs, ttl=ttl)
    return {"task_id": task_id, "headers": {ENVELOPE_HEADER: envelope}}


@dataclass(frozen=True)
class Verified:
    key_id: str
    nonce: str
    first_delivery: bool


class Verifier:
    """Checks envelopes against the allowed keys; remembers nonces in Redis until they expire."""

    def __init__(
        self, allowed: Iterable[str], client: redis.Redis | None, *, max_age: float = 3600.0, remember_s: float = 0.0
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
        if not isinstance(envelope, dict) or set(envelope) != {*_FIELDS, "signature"}:
            raise InvalidSignature("the envelope is malformed: it must have exactly " + ", ".join((*_FIELDS, "signature")))
        if not self.keys:
            raise InvalidSignature("this worker allows no scheduler keys (worker.security.allowed_schedulers is empty)")
        key_id = envelope["key_id"]
        verify_key = self.keys.get(key_id) if isinstance(key_id, str) else None
        if verify_key is None:
            raise InvalidSignature(f"key {key_id!r} is not in this worker's allowed_schedulers")
        unsigned = {name: envelope[name] for name in _FIELDS}
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
        return Verified(key_id=key_id, nonce=str(unsigned["nonce"]), first_delivery=first)

    def _check_matches(
        self, unsigned: Mapping[str, Any], *, task_name: str, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        if unsigned["v"] != 1:
            raise InvalidSignature(f"unknown envelope version {unsigned['v']!r}")
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
        except (TypeError, ValueError, RecursionError):
            digest = ""
        if unsigned["body_sha256"] != digest:
            raise InvalidSignature("the message's arguments differ from the signed ones")

    def _claim_nonce(self, key_id: str, nonce: str, task_id: str, expires: float) -> bool:
        """True on the first delivery of this envelope; a redelivery of the same task is allowed."""
        if self.redis is None:
            return True
        key = keys.nonce(key_id, nonce)
        try:
            claimed = self.redis.set(key, task_id, nx=True, exat=int(expires + CLOCK_SKEW_S) + 1)
            if claimed:
                return True
            holder: Any = self.redis.get(key)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RegistryUnavailable(f"cannot check the envelope nonce: {exc}") from None
        except redis.ResponseError as exc:
            raise InvalidSignature(f"the envelope's times are unusable: {exc}") from None
        if holder is not None and holder.decode() != task_id:
            raise InvalidSignature(f"replayed nonce: already used by task {holder.decode()}")
        return False
