"""Results signed by the worker that produced them: the attestation, its check, the worker's identity key."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from hypha_celery.errors import ConfigError, InvalidSignature
from hypha_celery.security import (
    ATTESTATION,
    attest,
    generate_key,
    load_identity,
    peer_id,
    request_digest,
    sign_envelope,
    verify_result,
)

TASK_ID = "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0001"
RESULT: dict[str, Any] = {"output": [[0.1, 0.7, 0.2]], "model": "mlp", "worker": "w1@host",
                          "metrics": {"duration_s": 0.0123, "cache_hit": True}}


@pytest.fixture
def worker_key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def signed(key: nacl.signing.SigningKey, result: dict[str, Any] | None = None, envelope: Any = None) -> dict[str, Any]:
    return attest(key, result or RESULT, task_id=TASK_ID, task_name="hypha.infer", worker="w1@host", envelope=envelope)


def test_a_signed_result_verifies_and_names_its_worker(worker_key: nacl.signing.SigningKey) -> None:
    # Given a result the worker signed
    result = signed(worker_key)
    # When a scheduler checks it, Then it returns the signer's peer id, and the result's fields are unchanged
    assert verify_result(result, TASK_ID) == peer_id(worker_key.verify_key)
    assert {name: result[name] for name in RESULT} == RESULT
    assert result[ATTESTATION]["peer"] == peer_id(worker_key.verify_key)


def test_a_changed_output_fails_by_name(worker_key: nacl.signing.SigningKey) -> None:
    # Given a signed result whose output was rewritten afterwards
    result = signed(worker_key)
    result["output"] = [[0.9, 0.05, 0.05]]
    # Then verification fails, saying the result was changed
    with pytest.raises(InvalidSignature, match="changed after worker"):
        verify_result(result, TASK_ID)


def test_a_changed_metric_fails_too(worker_key: nacl.signing.SigningKey) -> None:
    result = signed(worker_key)
    result["metrics"] = {**result["metrics"], "duration_s": 99.0}
    with pytest.raises(InvalidSignature, match="changed after worker"):
        verify_result(result, TASK_ID)


def test_a_result_signed_by_another_key_under_the_workers_peer_fails(worker_key: nacl.signing.SigningKey) -> None:
    # Given a forger who signs with its own key but claims the worker's peer id
    forged = signed(nacl.signing.SigningKey.generate())
    forged[ATTESTATION]["peer"] = peer_id(worker_key.verify_key)
    # Then the signature does not verify
    with pytest.raises(InvalidSignature, match="bad result signature"):
        verify_result(forged, TASK_ID)


def test_an_unsigned_result_fails(worker_key: nacl.signing.SigningKey) -> None:
    with pytest.raises(InvalidSignature, match="no attestation"):
        verify_result(dict(RESULT), TASK_ID)
    with pytest.raises(InvalidSignature, match="not an object"):
        verify_result([1, 2], TASK_ID)


def test_a_result_copied_from_another_task_fails(worker_key: nacl.signing.SigningKey) -> None:
    # Given a genuine signed result of one task, When it is stored under another task id, Then it is refused
    with pytest.raises(InvalidSignature, match="signed for task id"):
        verify_result(signed(worker_key), "another-task-id")


def test_only_allowed_workers_may_answer(worker_key: nacl.signing.SigningKey) -> None:
    result = signed(worker_key)
    other = peer_id(nacl.signing.SigningKey.generate().verify_key)
    # Given an allowed set without the signer, Then it is refused; with it (peer id or raw key), accepted
    with pytest.raises(InvalidSignature, match="not among the allowed workers"):
        verify_result(result, TASK_ID, allowed=[other])
    assert verify_result(result, TASK_ID, allowed=[other, peer_id(worker_key.verify_key)])
    assert verify_result(result, TASK_ID, allowed=[bytes(worker_key.verify_key).hex()])


def test_the_result_must_answer_the_request_sent(worker_key: nacl.signing.SigningKey) -> None:
    # Given the envelope a scheduler sent, and a result the worker signed for it
    scheduler = nacl.signing.SigningKey.generate()
    sent = sign_envelope(scheduler, task_name="hypha.infer", task_id=TASK_ID, kwargs={"model": "mlp"})
    result = signed(worker_key, envelope=sent)
    # Then it verifies against that request's digest, not against another one's
    assert verify_result(result, TASK_ID, request_digest=request_digest(sent), task_name="hypha.infer")
    other = sign_envelope(scheduler, task_name="hypha.infer", task_id=TASK_ID, kwargs={"model": "mlp"})
    with pytest.raises(InvalidSignature, match="another request"):
        verify_result(result, TASK_ID, request_digest=request_digest(other))
    with pytest.raises(InvalidSignature, match=r"signed for task 'hypha\.infer'"):
        verify_result(result, TASK_ID, task_name="hypha.generate")


def test_an_attestation_with_an_extra_field_is_malformed(worker_key: nacl.signing.SigningKey) -> None:
    result = signed(worker_key)
    result[ATTESTATION] = {**result[ATTESTATION], "note": "x"}
    with pytest.raises(InvalidSignature, match="malformed"):
        verify_result(result, TASK_ID)


def test_a_result_without_a_canonical_form_is_not_signed(worker_key: nacl.signing.SigningKey) -> None:
    # Given an output JCS cannot express, When the worker signs, Then it is refused (the pipeline stores it unsigned)
    with pytest.raises(ValueError):
        signed(worker_key, {**RESULT, "output": [float("nan")]})


def test_a_worker_makes_its_identity_once_and_keeps_it(tmp_path: Path) -> None:
    # Given a worker with no identity_key
    store = tmp_path / "models"
    # When it starts twice, Then the same key is made once, beside the store, mode 0600
    first = load_identity(None, store)
    second = load_identity(None, store)
    made = tmp_path / "worker.key"
    assert bytes(first) == bytes(second)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["worker.key"]  # no scratch files left


def test_a_named_identity_key_is_used_and_must_exist(tmp_path: Path) -> None:
    key = generate_key(tmp_path / "id.key")
    assert bytes(load_identity(str(tmp_path / "id.key"), tmp_path / "models")) == bytes(key)
    with pytest.raises(ConfigError, match=r"worker\.security\.identity_key"):
        load_identity(str(tmp_path / "missing.key"), tmp_path / "models")
    os.chmod(tmp_path / "id.key", 0o644)
    with pytest.raises(ConfigError, match=r"identity_key.*chmod 600"):
        load_identity(str(tmp_path / "id.key"), tmp_path / "models")


def test_an_overlong_peer_is_refused_before_it_is_decoded(worker_key: nacl.signing.SigningKey) -> None:
    # Given a result whose attestation names a peer of 200,000 characters (base58 decoding is quadratic in it)
    result = signed(worker_key)
    result[ATTESTATION] = {**result[ATTESTATION], "peer": "12D3KooW" + "z" * 200_000}
    # When it is verified, Then it is refused as no peer id, with the peer cut short in the message
    with pytest.raises(InvalidSignature, match="is not a worker peer id") as caught:
        verify_result(result, TASK_ID)
    assert len(str(caught.value)) < 400


def test_wait_checks_the_signature_as_get_does() -> None:
    # Celery's AsyncResult.wait is its get: a HyphaResult's wait must be its own, checking get
    from celery.result import AsyncResult

    from hypha_celery.client import HyphaResult

    assert HyphaResult.wait is HyphaResult.get and HyphaResult.wait is not AsyncResult.wait
