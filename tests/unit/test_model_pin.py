"""Pinning the exact model: the envelope's optional, signed ``model_sha256`` and the worker's check of it."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import nacl.signing
import pytest
from celery import Celery

from hypha_celery.errors import InvalidSignature, InvalidTask, ModelPinMismatch, UnsupportedModel
from hypha_celery.models.store import ModelStore
from hypha_celery.monitoring.metrics import Metrics
from hypha_celery.monitoring.tracing import Tracing
from hypha_celery.security import (
    ENVELOPE_HEADER,
    MODEL_SHA256,
    SIGNED_FIELDS,
    Verifier,
    canonical,
    peer_id,
    sign_envelope,
    signed_options,
)
from hypha_celery.stages.validation import check_model_pin
from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.pipeline import run_task

TASK = "hypha.infer"
KWARGS: dict[str, Any] = {"model": "mlp", "inputs": [[5.0, 3.4, 1.5, 0.2]]}
PIN = hashlib.sha256(b"a manifest").hexdigest()
OTHER = hashlib.sha256(b"another manifest").hexdigest()
MALFORMED = [PIN.upper(), PIN[:63], PIN + "0", "z" * 64, "", 7, None, ["x"], {"sha256": PIN}]


@pytest.fixture
def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


@pytest.fixture
def verifier(key: nacl.signing.SigningKey, fake_redis: fakeredis.FakeRedis) -> Verifier:
    return Verifier([peer_id(key.verify_key)], fake_redis)


def verify(verifier: Verifier, env: Any, task_id: str, kwargs: dict[str, Any] = KWARGS) -> Any:
    return verifier.verify(env, task_name=TASK, task_id=task_id, args=(), kwargs=kwargs)


def resign(key: nacl.signing.SigningKey, env: dict[str, Any]) -> dict[str, Any]:
    """Sign ``env`` again after a change on purpose, so only that change is under test."""
    unsigned = {name: value for name, value in env.items() if name != "signature"}
    return {**unsigned, "signature": base64.b64encode(key.sign(canonical(unsigned)).signature).decode()}


# --- the envelope -----------------------------------------------------------------------------------


def test_a_pin_is_signed_and_the_verifier_hands_it_on(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    # Given a scheduler that pins the model
    options = signed_options(key, TASK, kwargs=KWARGS, model_sha256=PIN)
    env = options["headers"][ENVELOPE_HEADER]
    # Then the envelope carries it, and the verified result names it
    assert env[MODEL_SHA256] == PIN and env["v"] == 2
    verified = verify(verifier, env, options["task_id"])
    assert verified.model_sha256 == PIN and verified.first_delivery


@pytest.mark.parametrize("change", ["altered", "removed"])
def test_tampering_with_the_pin_breaks_the_signature(
    key: nacl.signing.SigningKey, verifier: Verifier, change: str
) -> None:
    # Given a pinned envelope
    task_id = str(uuid.uuid4())
    env = sign_envelope(key, task_name=TASK, task_id=task_id, kwargs=KWARGS, model_sha256=PIN)
    # When the pin is changed to another valid one, or stripped, in transit
    if change == "altered":
        env[MODEL_SHA256] = OTHER
    else:
        del env[MODEL_SHA256]
    # Then the signature no longer holds
    with pytest.raises(InvalidSignature, match="bad signature"):
        verify(verifier, env, task_id)


def test_a_pin_added_to_an_unpinned_envelope_breaks_the_signature(
    key: nacl.signing.SigningKey, verifier: Verifier
) -> None:
    task_id = str(uuid.uuid4())
    env = sign_envelope(key, task_name=TASK, task_id=task_id, kwargs=KWARGS)
    env[MODEL_SHA256] = PIN
    with pytest.raises(InvalidSignature, match="bad signature"):
        verify(verifier, env, task_id)


def test_an_envelope_without_a_pin_signs_and_verifies_as_before(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    # Given an envelope made the way schedulers made them before the pin existed: exactly SIGNED_FIELDS
    task_id = str(uuid.uuid4())
    env = sign_envelope(key, task_name=TASK, task_id=task_id, kwargs=KWARGS)
    assert set(env) == {*SIGNED_FIELDS, "signature"}
    legacy = {name: env[name] for name in SIGNED_FIELDS}
    legacy["signature"] = base64.b64encode(key.sign(canonical(legacy)).signature).decode()
    # Then the signature is the one the old code made, and it verifies with no pin
    assert legacy["signature"] == env["signature"]
    assert verify(verifier, legacy, task_id).model_sha256 is None


@pytest.mark.parametrize("value", MALFORMED, ids=repr)
def test_a_malformed_pin_is_refused_even_when_signed(key: nacl.signing.SigningKey, verifier: Verifier, value: Any) -> None:
    # Given an envelope validly signed over a pin that is not a sha256 in lowercase hex
    task_id = str(uuid.uuid4())
    env = resign(key, {**sign_envelope(key, task_name=TASK, task_id=task_id, kwargs=KWARGS), MODEL_SHA256: value})
    # Then the worker refuses it, naming the field
    with pytest.raises(InvalidSignature, match="model_sha256 must be 64 lowercase hex characters"):
        verify(verifier, env, task_id)


def test_a_signed_pin_on_a_task_without_a_model_is_refused(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = str(uuid.uuid4())
    kwargs = {"hold_s": 0}
    env = resign(key, {**sign_envelope(key, task_name=TASK, task_id=task_id, kwargs=kwargs), MODEL_SHA256: PIN})
    with pytest.raises(InvalidSignature, match="model_sha256 pins a model, but it names none"):
        verify(verifier, env, task_id, kwargs=kwargs)


@pytest.mark.parametrize("value", MALFORMED[:5], ids=repr)
def test_the_scheduler_cannot_sign_a_malformed_pin(key: nacl.signing.SigningKey, value: Any) -> None:
    with pytest.raises(ValueError, match="model_sha256 must be 64 lowercase hex characters"):
        signed_options(key, TASK, kwargs=KWARGS, model_sha256=value)


def test_the_scheduler_cannot_pin_a_task_that_names_no_model(key: nacl.signing.SigningKey) -> None:
    with pytest.raises(ValueError, match="name no model"):
        signed_options(key, "hypha.noop", kwargs={"hold_s": 0}, model_sha256=PIN)


def test_submit_refuses_a_pin_without_a_key() -> None:
    from hypha_celery.client import submit

    app = Celery("pin-client", set_as_current=False)
    with pytest.raises(ValueError, match="pass signing_key"):
        submit(TASK, model="mlp", inputs=KWARGS["inputs"], app=app, queue="hypha", model_sha256=PIN)
    app.close()


# --- the worker's check -----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    """A store whose ``mlp`` entry is only a manifest: the pin is the sha256 of those bytes."""
    (tmp_path / "mlp").mkdir()
    (tmp_path / "mlp" / "manifest.json").write_bytes(b"a manifest")
    return ModelStore(tmp_path)


def test_a_matching_pin_passes(store: ModelStore) -> None:
    assert store.manifest_sha256("mlp") == PIN
    check_model_pin(store, "mlp", PIN)
    check_model_pin(store, "mlp", None)


def test_a_different_manifest_is_a_named_refusal(store: ModelStore) -> None:
    with pytest.raises(ModelPinMismatch, match=rf"model 'mlp': the task pins manifest sha256 {OTHER[:12]}\.\.\., "
                                               rf"this worker's store holds {PIN[:12]}\.\.\.") as caught:
        check_model_pin(store, "mlp", OTHER)
    # a refusal of the model, so the pipeline counts it as a validation refusal
    assert isinstance(caught.value, UnsupportedModel)


def test_a_model_not_here_yet_is_checked_once_fetched(store: ModelStore) -> None:
    # Given a model the store lacks (a worker with sources fetches it under the lease)
    check_model_pin(store, "absent", OTHER)
    # When it arrives, Then the same check refuses it
    (store.root / "absent").mkdir()
    (store.root / "absent" / "manifest.json").write_bytes(b"a manifest")
    with pytest.raises(ModelPinMismatch):
        check_model_pin(store, "absent", OTHER)


def test_a_pin_on_a_task_without_a_model_is_an_invalid_task(store: ModelStore) -> None:
    with pytest.raises(InvalidTask, match="names none"):
        check_model_pin(store, None, PIN)


# --- through run_task -------------------------------------------------------------------------------


class Recorded(Metrics):
    def __init__(self) -> None:
        self.refusals: list[str] = []

    def refused(self, stage: Any) -> None:
        self.refusals.append(stage)


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("pin-test", set_as_current=False)
    yield app
    app.close()


def probe(app: Celery, headers: dict[str, Any], task_id: str) -> HyphaTask:
    @app.task(name=TASK, base=HyphaTask, bind=True, shared=False)
    def task(self: HyphaTask, **kwargs: Any) -> None:
        return None

    task.push_request(id=task_id, hostname="w@host", headers=headers, delivery_info={})
    return task


def context(store: ModelStore, verifier: Verifier | None) -> SimpleNamespace:
    security = SimpleNamespace(verify_task_signatures=verifier is not None)
    return SimpleNamespace(config=SimpleNamespace(security=security), verifier=verifier, metrics=Recorded(), store=store,
                           tracing=Tracing())


def _validated(_: Any) -> Any:
    return SimpleNamespace(requirements=None)


def _never(*_: Any) -> Any:
    raise AssertionError("the pipeline went past a refusal")


def test_run_task_refuses_a_verified_pin_the_store_does_not_match(
    app: Celery, store: ModelStore, key: nacl.signing.SigningKey, verifier: Verifier
) -> None:
    # Given a worker that verifies signatures, and a task signed with a pin of another manifest
    options = signed_options(key, TASK, kwargs=KWARGS, model_sha256=OTHER)
    task = probe(app, options["headers"], options["task_id"])
    ctx = context(store, verifier)
    task.node = ctx  # type: ignore[assignment]
    # When it runs, Then it is refused before admission, and counted as a validation refusal
    with pytest.raises(ModelPinMismatch):
        run_task(task, dict(KWARGS), validate=_validated, body=_never)
    assert ctx.metrics.refusals == ["validation"]
    task.pop_request()


@pytest.mark.parametrize(
    ("pin", "error", "reason"),
    [(OTHER, ModelPinMismatch, "pins manifest sha256"), ("NOT-HEX", InvalidTask, "header's model_sha256 must be")],
)
def test_without_signature_checks_a_pin_in_the_header_is_still_honoured(
    app: Celery, store: ModelStore, key: nacl.signing.SigningKey, pin: str, error: type[Exception], reason: str
) -> None:
    # Given a worker that does not verify signatures, and a header with a pin (unverified)
    task_id = str(uuid.uuid4())
    env = {**sign_envelope(key, task_name=TASK, task_id=task_id, kwargs=KWARGS), MODEL_SHA256: pin}
    task = probe(app, {ENVELOPE_HEADER: env}, task_id)
    ctx = context(store, None)
    task.node = ctx  # type: ignore[assignment]
    # Then a pin of another manifest is refused by name, a malformed one as an invalid task naming the field
    with pytest.raises(error, match=reason):
        run_task(task, dict(KWARGS), validate=_validated, body=_never)
    assert ctx.metrics.refusals == ["validation"]
    task.pop_request()
