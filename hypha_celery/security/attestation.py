"""Results signed by the worker that produced them: the worker's identity key, the attestation, its check.

The scheduler's envelope authenticates a request; nothing authenticated the answer: anything that
can write to the result backend could put any output under any task id. Each worker holds its own
Ed25519 identity (``[worker.security] identity_key``, else ``worker.key`` beside its model store,
made at first start with mode 0600 and kept), and with ``sign_results = true`` (the default) every
hypha task's result carries an ``attestation`` member::

    {"output": ..., "model": ..., "worker": ..., "metrics": {...},
     "attestation": {"v": 1, "task_id": "<id>", "task": "hypha.infer",
                     "request_sha256": "<hex of the bytes the scheduler signed> | null",
                     "result_sha256": "<hex of JCS(the result without its attestation)>",
                     "worker": "<worker name>", "peer": "12D3KooW...", "signature": "<base64>"}}

``signature`` is Ed25519 over the RFC 8785 form of the attestation without ``signature``.
``result_sha256`` covers everything else in the result (output, model, worker, metrics), so
nothing a scheduler reads there can be changed; ``request_sha256`` ties it to the signed request
(null for a task that came without an envelope). :func:`verify_result` is the scheduler's check;
``docs/envelope.md`` specifies it with test vectors (``docs/envelope-vectors/5*.json``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing
from kombu.utils import json as kombu_json

from hypha_celery.errors import ConfigError, InvalidSignature
from hypha_celery.security.envelope import canonical, generate_key, load_signing_key, peer_id, public_key_from_id

__all__ = [
    "ATTESTATION",
    "ATTESTATION_FIELDS",
    "ATTESTATION_VERSION",
    "IDENTITY_FILE",
    "attest",
    "digest",
    "load_identity",
    "request_digest",
    "verify_result",
]

ATTESTATION = "attestation"  # the member of a task's result that holds the worker's signed statement
ATTESTATION_VERSION = 1
ATTESTATION_FIELDS = ("v", "task_id", "task", "request_sha256", "result_sha256", "worker", "peer")
IDENTITY_FILE = "worker.key"  # made beside the model store when identity_key is not set


def digest(value: Any) -> str:
    """SHA-256 (hex) of a JSON value's RFC 8785 form; ``ValueError`` when it has none."""
    return hashlib.sha256(canonical(value)).hexdigest()


def request_digest(envelope: Any) -> str | None:
    """The digest of a signed request envelope: SHA-256 of the bytes its scheduler signed (it less ``signature``).

    None for no usable envelope (absent, not an object, no canonical form).
    """
    if not isinstance(envelope, Mapping):
        return None
    try:
        return digest({name: value for name, value in envelope.items() if name != "signature"})
    except (TypeError, ValueError):
        return None


def _canonical_result(result: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
    """``result`` as a scheduler decodes it from the backend (tuples as lists, keys as strings), and its JCS bytes."""
    value = {name: item for name, item in result.items() if name != ATTESTATION}
    try:
        return value, canonical(value)
    except (TypeError, ValueError):  # non-string keys, tuples of odd things: what JSON makes of them
        decoded: dict[str, Any] = kombu_json.loads(kombu_json.dumps(value))
        return decoded, canonical(decoded)


def attest(
    key: nacl.signing.SigningKey, result: Mapping[str, Any], *, task_id: str, task_name: str, worker: str,
    envelope: Any = None, request_sha256: str | None = None,
) -> dict[str, Any]:
    """``result`` with its ``attestation``; ``ValueError`` when the result has no RFC 8785 form (NaN, big ints).

    ``request_sha256``: the request's digest where the caller has it (the verifier computes it while it
    checks the envelope), else taken from ``envelope``.
    """
    body, body_bytes = _canonical_result(result)
    statement: dict[str, Any] = {
        "v": ATTESTATION_VERSION,
        "task_id": task_id,
        "task": task_name,
        "request_sha256": request_sha256 if request_sha256 is not None else request_digest(envelope),
        "result_sha256": hashlib.sha256(body_bytes).hexdigest(),
        "worker": worker,
        "peer": _peer(bytes(key.verify_key)),
    }
    statement["signature"] = base64.b64encode(key.sign(canonical(statement)).signature).decode()
    return {**body, ATTESTATION: statement}


@functools.lru_cache(maxsize=16)  # a worker signs every result with one key: its base58 peer id, computed once
def _peer(public_key: bytes) -> str:
    return peer_id(nacl.signing.VerifyKey(public_key))


def verify_result(
    result: Any,
    task_id: str,
    *,
    allowed: Iterable[str] | None = None,
    request_digest: str | None = None,
    task_name: str | None = None,
) -> str:
    """Check a stored result's attestation; return the signer's peer id, else raise ``InvalidSignature``.

    ``allowed``: peer ids (or public keys in base64 / hex) of the workers trusted to answer; None
    trusts any worker that signs correctly. ``request_digest``: what the scheduler sent (the digest
    of its envelope, :func:`request_digest`); ``task_name``: the task it asked for.
    """
    if not isinstance(result, Mapping):
        raise InvalidSignature(f"task {task_id}: the result is not an object, so it carries no attestation")
    statement = result.get(ATTESTATION)
    if not isinstance(statement, Mapping):
        raise InvalidSignature(f"task {task_id}: the result carries no attestation (an unsigned worker, or forged)")
    if set(statement) != {*ATTESTATION_FIELDS, "signature"}:
        raise InvalidSignature(f"task {task_id}: the attestation is malformed: it must have exactly "
                               + ", ".join((*ATTESTATION_FIELDS, "signature")))
    if type(statement["v"]) is not int or statement["v"] != ATTESTATION_VERSION:
        raise InvalidSignature(f"task {task_id}: unknown attestation version {statement['v']!r} "
                               f"(this side verifies v{ATTESTATION_VERSION})")
    peer = statement["peer"]
    try:
        verify_key = nacl.signing.VerifyKey(public_key_from_id(peer if isinstance(peer, str) else ""))
    except ValueError:
        raise InvalidSignature(f"task {task_id}: the attestation's peer {str(peer)[:80]!r} is not a worker peer id") from None
    unsigned = {name: statement[name] for name in ATTESTATION_FIELDS}
    try:
        verify_key.verify(canonical(unsigned), base64.b64decode(statement["signature"], validate=True))
    except (binascii.Error, ValueError, TypeError, nacl.exceptions.BadSignatureError):
        raise InvalidSignature(f"task {task_id}: bad result signature for worker {peer} "
                               "(forged, or the attestation was altered)") from None
    if statement["task_id"] != task_id:
        raise InvalidSignature(f"task {task_id}: the result was signed for task id {statement['task_id']!r} "
                               "(a result copied from another task)")
    if task_name is not None and statement["task"] != task_name:
        raise InvalidSignature(f"task {task_id}: the result was signed for task {statement['task']!r}, not {task_name!r}")
    if request_digest is not None and statement["request_sha256"] != request_digest:
        raise InvalidSignature(f"task {task_id}: the result answers another request than the one sent")
    try:
        body = digest({name: value for name, value in result.items() if name != ATTESTATION})
    except (TypeError, ValueError):
        body = None
    if body != statement["result_sha256"]:
        raise InvalidSignature(f"task {task_id}: the result was changed after worker {peer} signed it "
                               "(its output, model, worker or metrics differ from the signed digest)")
    if allowed is not None:
        trusted = set()
        for entry in allowed:
            try:
                trusted.add(peer_id(nacl.signing.VerifyKey(public_key_from_id(entry))))
            except ValueError as exc:
                raise ValueError(f"allowed workers: {exc}") from None
        if _peer(bytes(verify_key)) not in trusted:
            raise InvalidSignature(f"task {task_id}: the result was signed by worker {peer}, "
                                   "which is not among the allowed workers")
    return _peer(bytes(verify_key))


def load_identity(path: str | os.PathLike[str] | None, model_dir: str | os.PathLike[str]) -> nacl.signing.SigningKey:
    """The worker's identity key: read from ``path``, else made once beside the store (``worker.key``, 0600) and kept.

    A key at an explicit ``path`` must exist (``hypha-celery keys generate PATH``); the default one is
    created atomically, so workers starting together on one node agree on it.
    """
    if path is not None:
        return _load(path)
    default = Path(model_dir).resolve().parent / IDENTITY_FILE
    if default.exists():
        return _load(default)
    try:
        default.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=default.parent, prefix=".worker-key-") as scratch:
            made = Path(scratch) / IDENTITY_FILE
            key = generate_key(made)
            try:
                os.link(made, default)  # atomic, and never replaces a key another worker just made
            except FileExistsError:
                return _load(default)
            return key
    except OSError as exc:
        raise ConfigError("worker.security.identity_key",
                          f"cannot create the worker identity {default}: {exc.strerror}; set identity_key "
                          "to a key made with `hypha-celery keys generate PATH`") from None


def _load(path: str | os.PathLike[str]) -> nacl.signing.SigningKey:
    try:
        return load_signing_key(path)
    except ConfigError as exc:
        raise ConfigError("worker.security.identity_key", exc.reason) from None
