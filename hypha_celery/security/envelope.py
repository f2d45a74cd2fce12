"""Ed25519-signed task envelopes, the signing side: canonical form, digests, peer ids, key files.

What a scheduler needs to sign (:func:`signed_options`); the worker's check is
:mod:`hypha_celery.security.verifier`. The format is described in
:mod:`hypha_celery.security`, and for implementers in other languages in
``docs/envelope.md`` (with test vectors in ``docs/envelope-vectors/``).

The canonical form is RFC 8785, the JSON Canonicalization Scheme (JCS), through
the ``rfc8785`` package: numbers as ECMAScript prints them, keys sorted by UTF-16
code units, strings in UTF-8 with minimal escapes. That is what makes a signature
reproducible outside Python; envelope version 1 used ``json.dumps`` and is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import base58
import nacl.exceptions
import nacl.signing
import rfc8785

from hypha_celery.errors import ConfigError

__all__ = [
    "CLOCK_SKEW_S",
    "DEFAULT_TTL_S",
    "ENVELOPE_HEADER",
    "ENVELOPE_VERSION",
    "MODEL_SHA256",
    "OPTIONAL_SIGNED_FIELDS",
    "SIGNED_FIELDS",
    "body_digest",
    "canonical",
    "check_model_sha256",
    "check_version",
    "generate_key",
    "load_signing_key",
    "peer_id",
    "public_key_from_id",
    "sign_envelope",
    "signed_options",
]

ENVELOPE_HEADER = "hypha_envelope"
ENVELOPE_VERSION = 2  # 2: RFC 8785 canonical form (1: Python's json.dumps, refused since)
DEFAULT_TTL_S = 300.0
CLOCK_SKEW_S = 60.0
_PEER_PREFIX = b"\x00\x24\x08\x01\x12\x20"  # identity multihash, 36 bytes of protobuf PublicKey{Ed25519}
# The envelope's fields that the signature covers, i.e. all but "signature": these in every envelope,
# OPTIONAL_SIGNED_FIELDS only when the scheduler set them (an envelope without one signs as it always did).
SIGNED_FIELDS = ("v", "key_id", "task", "id", "model", "requirements", "body_sha256", "issued_at", "expires_at", "nonce")
MODEL_SHA256 = "model_sha256"  # pins the model: the sha256 of its store entry's manifest.json
OPTIONAL_SIGNED_FIELDS = (MODEL_SHA256,)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_model_sha256(value: Any) -> str:
    """``value`` if it is a sha256 in 64 lowercase hex characters, else ``ValueError`` naming the field."""
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else value
        raise ValueError(f"{MODEL_SHA256} must be 64 lowercase hex characters (a manifest's sha256), got {shown!r}")
    return value


def check_version(value: Any) -> int:
    """``value`` if it is this envelope version, else ``ValueError`` naming the version this side speaks."""
    if type(value) is int and value == ENVELOPE_VERSION:
        return value
    if type(value) is int and value == 1:
        raise ValueError(
            "envelope version 1 (canonical form: Python's json.dumps) is no longer accepted: this worker verifies "
            f"v{ENVELOPE_VERSION} envelopes, canonicalized by RFC 8785 (JCS); upgrade the scheduler (see docs/envelope.md)"
        )
    raise ValueError(f"unknown envelope version {value!r}: this worker verifies v{ENVELOPE_VERSION} "
                     "(RFC 8785 / JCS canonical form, docs/envelope.md)")


def canonical(value: Any) -> bytes:
    """The one byte string a JSON value signs as: its RFC 8785 (JCS) canonical form.

    ``ValueError`` (``rfc8785.CanonicalizationError``) for what JCS cannot express: NaN and
    infinities, integers beyond +-(2**53 - 1) (send those as strings), strings that are not
    valid Unicode (lone surrogates), object keys that are not strings, values that are not JSON.
    """
    return rfc8785.dumps(value)


def body_digest(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of ``{"args": [...], "kwargs": {...}}`` in canonical form: what binds an envelope to its body."""
    return hashlib.sha256(canonical({"args": list(args), "kwargs": dict(kwargs)})).hexdigest()



def peer_id(verify_key: nacl.signing.VerifyKey) -> str:
    """The libp2p peer id of an Ed25519 public key."""
    return base58.b58encode(_PEER_PREFIX + bytes(verify_key)).decode()


def public_key_from_id(text: str) -> bytes:
    """Public key bytes from a peer id, or from a base64 / hex encoded 32-byte key."""
    text = text.strip()
    if len(text) > 128:  # a peer id is 52 characters; base58 decoding takes time quadratic in the length
        raise ValueError(f"{text[:60]!r}... ({len(text)} characters) is not a key or a peer id")
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
    model_sha256: str | None = None,
    nonce: str | None = None,
) -> dict[str, Any]:
    """The signed envelope for one task message; ``model_sha256`` pins its model (see :mod:`hypha_celery.security`).

    ``now`` and ``nonce`` are for reproducible test vectors; leave them unset to sign a real task.
    """
    kwargs = dict(kwargs or {})
    if model_sha256 is not None:
        check_model_sha256(model_sha256)
        if kwargs.get("model") is None:
            raise ValueError(f"{MODEL_SHA256} pins the task's model, but these arguments name no model")
    issued = time.time() if now is None else now
    envelope: dict[str, Any] = {
        "v": ENVELOPE_VERSION,
        "key_id": peer_id(key.verify_key),
        "task": task_name,
        "id": task_id,
        "model": kwargs.get("model"),
        "requirements": kwargs.get("requirements"),
        "body_sha256": body_digest(args, kwargs),
        "issued_at": issued,
        "expires_at": issued + ttl,
        "nonce": secrets.token_hex(16) if nonce is None else nonce,
    }
    if model_sha256 is not None:
        envelope[MODEL_SHA256] = model_sha256
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
    model_sha256: str | None = None,
) -> dict[str, Any]:
    """``task_id`` and ``headers`` to pass to ``apply_async`` / ``send_task`` for a signed message.

    ``model_sha256`` (what ``hypha-celery models sha256 ID`` prints) pins the exact model: a worker
    whose store holds another manifest under that id refuses the task with ``ModelPinMismatch``.
    """
    task_id = task_id or str(uuid.uuid4())
    envelope = sign_envelope(key, task_name=task_name, task_id=task_id, args=args, kwargs=kwargs, ttl=ttl,
                             model_sha256=model_sha256)
    return {"task_id": task_id, "headers": {ENVELOPE_HEADER: envelope}}
