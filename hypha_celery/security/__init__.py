"""Ed25519-signed task envelopes: schedulers sign, workers verify before anything runs.

Celery's ``auth`` serializer signs the message body only, with no expiry or
nonce; a captured message can be replayed forever and re-addressed to another
task id. Here a scheduler signs a *canonical envelope* that names the task,
its id, a hash of its arguments, its model and requirements, when it was
issued, when it expires, and a random nonce. The envelope travels in the
message header ``hypha_envelope``::

    {"v": 2, "key_id": "12D3KooW...", "task": "hypha.infer", "id": "<task id>",
     "model": "mlp", "requirements": {...}, "body_sha256": "<hex>",
     "issued_at": 1700000000.0, "expires_at": 1700000300.0, "nonce": "<hex>",
     "signature": "<base64 Ed25519 signature of the canonical JSON of the other fields>"}

"Canonical" is RFC 8785, the JSON Canonicalization Scheme, for the envelope and
for ``body_sha256`` (the SHA-256 of ``{"args": [...], "kwargs": {...}}``), so a
scheduler in any language can sign: ``docs/envelope.md`` is the full spec, with
test vectors in ``docs/envelope-vectors/``. Version 1 (canonical form Python's
``json.dumps``) is refused with ``InvalidSignature`` naming version 2.

An envelope may also carry ``"model_sha256": "<hex>"``, the sha256 of the
model's ``manifest.json`` in the store (``ModelStore.manifest_sha256``,
``hypha-celery models sha256 ID``): it pins the exact model, and the worker
refuses the task with ``ModelPinMismatch`` when its store holds a different
manifest under that id. The field is optional and signed like the others when
present (64 lowercase hex characters, else ``InvalidSignature``); an envelope
without it is byte for byte what it would be without the pin, so the field
did not need a version of its own. A worker
from before the field existed checks for an exact key set and so refuses a
pinned envelope as malformed: a pin is never silently ignored. With
``verify_task_signatures = false`` a worker still honours a pin it finds in the
header (unverified; a malformed one is ``InvalidTask``): a pin only restricts
what may run, so honouring it cannot let anything run that would not have run
without it (unsigned, it guards against a store that drifted, not against
whoever can rewrite messages on the broker).

Key ids are libp2p peer ids (``12D3KooW...``): the identity multihash of the
Ed25519 public key, so a peer id *is* the public key and ``allowed_schedulers``
can list peer ids (or raw public keys in base64 or hex).

The answer is signed too: each worker's identity key signs an ``attestation`` in every hypha
task's result (:mod:`hypha_celery.security.attestation`), which a scheduler checks with
:func:`verify_result`.

Using it with plain Celery::

    key = load_signing_key("scheduler.key")
    task.apply_async(kwargs=kw, **signed_options(key, "hypha.infer", kwargs=kw))
"""

from __future__ import annotations

from hypha_celery.security.attestation import (
    ATTESTATION,
    ATTESTATION_FIELDS,
    ATTESTATION_VERSION,
    attest,
    load_identity,
    request_digest,
    verify_result,
)
from hypha_celery.security.envelope import (
    CLOCK_SKEW_S,
    DEFAULT_TTL_S,
    ENVELOPE_HEADER,
    ENVELOPE_VERSION,
    MODEL_SHA256,
    OPTIONAL_SIGNED_FIELDS,
    SIGNED_FIELDS,
    body_digest,
    canonical,
    check_model_sha256,
    check_version,
    generate_key,
    load_signing_key,
    peer_id,
    public_key_from_id,
    sign_envelope,
    signed_options,
)
from hypha_celery.security.verifier import NonceRecord, Verified, Verifier, record_sent, replay_window

__all__ = [
    "ATTESTATION",
    "ATTESTATION_FIELDS",
    "ATTESTATION_VERSION",
    "CLOCK_SKEW_S",
    "DEFAULT_TTL_S",
    "ENVELOPE_HEADER",
    "ENVELOPE_VERSION",
    "MODEL_SHA256",
    "OPTIONAL_SIGNED_FIELDS",
    "SIGNED_FIELDS",
    "NonceRecord",
    "Verified",
    "Verifier",
    "attest",
    "body_digest",
    "canonical",
    "check_model_sha256",
    "check_version",
    "generate_key",
    "load_identity",
    "load_signing_key",
    "peer_id",
    "public_key_from_id",
    "record_sent",
    "replay_window",
    "request_digest",
    "sign_envelope",
    "signed_options",
    "verify_result",
]
