"""Unit tests for the signed task envelopes (hypha_celery.security), on fakeredis."""

from __future__ import annotations

import base64
import os
import re
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import fakeredis
import nacl.signing
import pytest

from hypha_celery import keys
from hypha_celery.errors import ConfigError, InvalidSignature, RegistryUnavailable
from hypha_celery.security import (
    CLOCK_SKEW_S,
    ENVELOPE_HEADER,
    NonceRecord,
    Verifier,
    body_digest,
    canonical,
    generate_key,
    load_signing_key,
    peer_id,
    public_key_from_id,
    record_sent,
    replay_window,
    sign_envelope,
    signed_options,
)

TASK = "hypha.infer"
KWARGS: dict[str, Any] = {
    "model": "mlp",
    "inputs": [[5.0, 3.4, 1.5, 0.2]],
    "requirements": {"cpu_cores": 1, "memory": "256MiB"},
}
FIELDS = ("v", "key_id", "task", "id", "model", "requirements", "body_sha256", "issued_at", "expires_at", "nonce")


@pytest.fixture
def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


@pytest.fixture
def verifier(key: nacl.signing.SigningKey, fake_redis: fakeredis.FakeRedis) -> Verifier:
    return Verifier([peer_id(key.verify_key)], fake_redis)


def new_id() -> str:
    return str(uuid.uuid4())


def envelope(key: nacl.signing.SigningKey, task_id: str, **options: Any) -> dict[str, Any]:
    kwargs = options.pop("kwargs", KWARGS)
    return sign_envelope(key, task_name=options.pop("task_name", TASK), task_id=task_id, kwargs=kwargs, **options)


def resign(key: nacl.signing.SigningKey, env: dict[str, Any]) -> dict[str, Any]:
    """Sign ``env`` again (after a field was changed on purpose) so only that change is under test."""
    unsigned = {name: env[name] for name in FIELDS}
    return {**unsigned, "signature": base64.b64encode(key.sign(canonical(unsigned)).signature).decode()}


def verify(verifier: Verifier, env: Any, task_id: str, **overrides: Any) -> Any:
    return verifier.verify(
        env,
        task_name=overrides.get("task_name", TASK),
        task_id=task_id,
        args=overrides.get("args", ()),
        kwargs=overrides.get("kwargs", KWARGS),
        now=overrides.get("now"),
    )


# --- keys and ids -----------------------------------------------------------------------------------


def test_peer_id_is_a_libp2p_ed25519_id_and_round_trips(key: nacl.signing.SigningKey) -> None:
    pid = peer_id(key.verify_key)
    assert pid.startswith("12D3KooW") and len(pid) == 52
    assert public_key_from_id(pid) == bytes(key.verify_key)
    assert public_key_from_id(f"  {pid}\n") == bytes(key.verify_key)


def test_public_key_from_base64_and_hex(key: nacl.signing.SigningKey) -> None:
    raw = bytes(key.verify_key)
    assert public_key_from_id(base64.b64encode(raw).decode()) == raw
    assert public_key_from_id(raw.hex()) == raw
    assert public_key_from_id(raw.hex().upper()) == raw


@pytest.mark.parametrize(
    "text",
    [
        "",
        "junk",
        "scheduler1-peer-id",
        "12D3KooWnotbase58!!",
        "12D3KooW" + "1" * 44,  # base58 but not the Ed25519 identity multihash
        "00" * 31,  # hex of 31 bytes
        "00" * 33,  # hex of 33 bytes
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 64).decode(),
        "/ip4/127.0.0.1/tcp/4001",
    ],
)
def test_public_key_from_junk_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"peer id|public key"):
        public_key_from_id(text)


def test_peer_id_of_another_key_type_is_refused(key: nacl.signing.SigningKey) -> None:
    import base58

    # a secp256k1-style protobuf prefix (KeyType 2) instead of Ed25519 (1)
    raw = b"\x00\x24\x08\x02\x12\x20" + bytes(key.verify_key)
    text = base58.b58encode(raw).decode()
    with pytest.raises(ValueError):
        public_key_from_id(text)


def test_generate_key_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.key"
    key = generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert base64.b64decode(path.read_text().strip()) == bytes(key)
    assert bytes(load_signing_key(path)) == bytes(key)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key(path)
    assert path.read_bytes() == before


def test_generate_key_mode_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k"
        generate_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640, 0o660, 0o666])
def test_load_signing_key_refuses_a_file_others_can_read(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "scheduler.key"
    generate_key(path)
    path.chmod(mode)
    with pytest.raises(ConfigError, match="readable by others") as caught:
        load_signing_key(path)
    assert caught.value.key == "signing_key"


def test_load_signing_key_missing_or_garbage(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_signing_key(tmp_path / "absent.key")
    bad = tmp_path / "bad.key"
    bad.write_text("not base64 at all!\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="base64 Ed25519 seed"):
        load_signing_key(bad)
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(b"x" * 16).decode())
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="base64 Ed25519 seed"):
        load_signing_key(short)


def test_verifier_refuses_a_bad_allowed_entry(fake_redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(ConfigError, match=r"allowed_schedulers\[1\]"):
        Verifier([peer_id(nacl.signing.SigningKey.generate().verify_key), "scheduler1-peer-id"], fake_redis)


# --- the round trip ---------------------------------------------------------------------------------


def test_sign_and_verify_round_trip(key: nacl.signing.SigningKey, verifier: Verifier, fake_redis: Any) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    assert set(env) == {*FIELDS, "signature"}
    assert env["v"] == 2 and env["key_id"] == peer_id(key.verify_key)
    assert env["task"] == TASK and env["id"] == task_id
    assert env["model"] == "mlp" and env["requirements"] == KWARGS["requirements"]
    assert env["body_sha256"] == body_digest((), KWARGS)
    assert env["expires_at"] - env["issued_at"] == pytest.approx(300.0)
    verified = verify(verifier, env, task_id)
    assert verified.key_id == peer_id(key.verify_key)
    assert verified.nonce == env["nonce"]
    assert verified.first_delivery is True
    # the nonce is remembered, for the task id, for the replay window (max_age, by default 3600 s) + skew
    stored = keys.nonce(env["key_id"], env["nonce"])
    record = NonceRecord.loads(fake_redis.get(stored))
    assert record.task == task_id and record.delivered and not record.done
    assert 3600 < fake_redis.ttl(stored) <= 3600 + CLOCK_SKEW_S + 2


def test_envelope_survives_a_json_round_trip(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    import json

    task_id = new_id()
    env = json.loads(json.dumps(envelope(key, task_id)))
    kwargs = json.loads(json.dumps(KWARGS))
    assert verify(verifier, env, task_id, kwargs=kwargs).first_delivery


def test_positional_args_are_signed_too(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = new_id()
    env = sign_envelope(key, task_name=TASK, task_id=task_id, args=[1, 2], kwargs=KWARGS)
    assert verify(verifier, env, task_id, args=[1, 2]).first_delivery
    with pytest.raises(InvalidSignature, match="arguments differ"):
        verify(verifier, env, task_id, args=[1, 3])


def test_nonces_are_fresh(key: nacl.signing.SigningKey) -> None:
    nonces = {envelope(key, new_id())["nonce"] for _ in range(50)}
    assert len(nonces) == 50


def test_signed_options_gives_task_id_and_header(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    options = signed_options(key, TASK, kwargs=KWARGS)
    assert set(options) == {"task_id", "headers"}
    assert set(options["headers"]) == {ENVELOPE_HEADER} and ENVELOPE_HEADER == "hypha_envelope"
    env = options["headers"][ENVELOPE_HEADER]
    assert env["id"] == options["task_id"]
    uuid.UUID(options["task_id"])
    assert verify(verifier, env, options["task_id"]).first_delivery
    chosen = signed_options(key, TASK, kwargs=KWARGS, task_id="my-id", ttl=60)
    assert chosen["task_id"] == "my-id" and chosen["headers"][ENVELOPE_HEADER]["id"] == "my-id"
    env = chosen["headers"][ENVELOPE_HEADER]
    assert env["expires_at"] - env["issued_at"] == pytest.approx(60.0)


# --- refusals ---------------------------------------------------------------------------------------


def test_no_envelope(verifier: Verifier) -> None:
    with pytest.raises(InvalidSignature, match="carries no signed envelope"):
        verify(verifier, None, new_id())


def test_an_unsigned_task_is_told_how_to_sign(verifier: Verifier) -> None:
    # When a task with no envelope reaches a verifying worker
    with pytest.raises(InvalidSignature) as caught:
        verify(verifier, None, new_id())
    # Then the refusal says how to sign one: the CLI's --key, or submit's signing_key
    assert "sign with --key" in str(caught.value) and "signing_key=" in str(caught.value)


@pytest.mark.parametrize("change", ["missing", "extra", "not_a_dict", "list", "string"])
def test_malformed_envelope(key: nacl.signing.SigningKey, verifier: Verifier, change: str) -> None:
    task_id = new_id()
    env: Any = envelope(key, task_id)
    if change == "missing":
        del env["nonce"]
    elif change == "extra":
        env["note"] = "hi"
    elif change == "not_a_dict":
        env = 42
    elif change == "list":
        env = list(env.items())
    else:
        env = canonical(env).decode()
    with pytest.raises(InvalidSignature, match="malformed"):
        verify(verifier, env, task_id)


@pytest.mark.parametrize("field", [*FIELDS, "signature"])
def test_each_missing_field_is_malformed(key: nacl.signing.SigningKey, verifier: Verifier, field: str) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    del env[field]
    with pytest.raises(InvalidSignature, match="malformed"):
        verify(verifier, env, task_id)


@pytest.mark.parametrize("key_id", ["nobody", "", None, 7, ["x"], "12D3KooWunknown"])
def test_unknown_key_id(key: nacl.signing.SigningKey, verifier: Verifier, key_id: Any) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    env["key_id"] = key_id
    with pytest.raises(InvalidSignature, match="not in this worker's allowed_schedulers"):
        verify(verifier, env, task_id)


def test_key_not_in_allowed_list(verifier: Verifier) -> None:
    stranger = nacl.signing.SigningKey.generate()
    task_id = new_id()
    with pytest.raises(InvalidSignature, match="not in this worker's allowed_schedulers"):
        verify(verifier, envelope(stranger, task_id), task_id)


def test_allowed_key_id_with_another_keys_signature(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    stranger = nacl.signing.SigningKey.generate()
    task_id = new_id()
    env = envelope(stranger, task_id)
    env["key_id"] = peer_id(key.verify_key)
    env = {**env, "signature": base64.b64encode(stranger.sign(canonical({f: env[f] for f in FIELDS})).signature).decode()}
    with pytest.raises(InvalidSignature, match="bad signature"):
        verify(verifier, env, task_id)


@pytest.mark.parametrize("position", [0, 17, 63])
def test_flipped_signature_byte(key: nacl.signing.SigningKey, verifier: Verifier, position: int) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    raw = bytearray(base64.b64decode(env["signature"]))
    raw[position] ^= 0x01
    env["signature"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(InvalidSignature, match="bad signature"):
        verify(verifier, env, task_id)


@pytest.mark.parametrize("signature", ["", "not base64!", "AAAA", 12345, None, base64.b64encode(b"\0" * 64).decode()])
def test_garbage_signature(key: nacl.signing.SigningKey, verifier: Verifier, signature: Any) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    env["signature"] = signature
    with pytest.raises(InvalidSignature, match="bad signature"):
        verify(verifier, env, task_id)


ALTERED = {
    "task": "hypha.train",
    "id": "another-task-id",
    "model": "cnn",
    "requirements": {"cpu_cores": 4, "memory": "2GB"},
    "body_sha256": "0" * 64,
    "issued_at": "later",
    "expires_at": 1e12,
    "nonce": "0" * 32,
    "v": 3,
}


@pytest.mark.parametrize("field", sorted(ALTERED))
def test_each_signed_field_altered_after_signing(key: nacl.signing.SigningKey, verifier: Verifier, field: str) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    env[field] = ALTERED[field]
    # the message is altered to match, so only the signature can catch it
    overrides: dict[str, Any] = {}
    if field == "task":
        overrides["task_name"] = ALTERED["task"]
    if field == "model":
        overrides["kwargs"] = {**KWARGS, "model": "cnn"}
    if field == "requirements":
        overrides["kwargs"] = {**KWARGS, "requirements": ALTERED["requirements"]}
    # (the version is read before the signature, to name the version a worker speaks)
    with pytest.raises(InvalidSignature, match="unknown envelope version" if field == "v" else "bad signature"):
        verify(verifier, env, ALTERED["id"] if field == "id" else task_id, **overrides)


def test_issued_at_nudged_by_a_millisecond(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    env["issued_at"] += 0.001
    with pytest.raises(InvalidSignature, match="bad signature"):
        verify(verifier, env, task_id)


MISMATCHES: dict[str, tuple[dict[str, Any], str]] = {
    "task name": ({"task_name": "hypha.train"}, "signed for task 'hypha.infer', delivered as 'hypha.train'"),
    "task id": ({"task_id": "another-task-id"}, "signed for task id"),
    "model": ({"kwargs": {**KWARGS, "model": "cnn"}}, "names model 'mlp', the message 'cnn'"),
    "requirements": ({"kwargs": {**KWARGS, "requirements": {"cpu_cores": 4, "memory": "2GB"}}}, "requirements differ"),
    "no requirements": ({"kwargs": {k: v for k, v in KWARGS.items() if k != "requirements"}}, "requirements differ"),
    "inputs": ({"kwargs": {**KWARGS, "inputs": [[6.0, 3.4, 1.5, 0.2]]}}, "arguments differ"),
    "extra kwarg": ({"kwargs": {**KWARGS, "extra": 1}}, "arguments differ"),
    "args": ({"args": ["mlp"]}, "arguments differ"),
}


@pytest.mark.parametrize("what", sorted(MISMATCHES))
def test_message_altered_after_signing(key: nacl.signing.SigningKey, verifier: Verifier, what: str) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    overrides, reason = MISMATCHES[what]
    overrides = dict(overrides)
    delivered_id = overrides.pop("task_id", task_id)
    with pytest.raises(InvalidSignature, match=re.escape(reason)):
        verify(verifier, env, delivered_id, **overrides)


def test_mismatch_does_not_burn_the_nonce(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    with pytest.raises(InvalidSignature, match="signed for task id"):
        verify(verifier, env, "someone-else")
    assert verify(verifier, env, task_id).first_delivery


def test_unknown_version_even_when_signed(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    env["v"] = 3
    with pytest.raises(InvalidSignature, match="unknown envelope version 3"):
        verify(verifier, resign(key, env), task_id)


def test_expired(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = new_id()
    env = envelope(key, task_id, now=time.time() - 1000, ttl=300)
    with pytest.raises(InvalidSignature, match=r"expired \d+s ago"):
        verify(verifier, env, task_id)


def test_expired_by_the_verifiers_clock(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = new_id()
    env = envelope(key, task_id, ttl=60)
    with pytest.raises(InvalidSignature, match="expired"):
        verify(verifier, env, task_id, now=env["expires_at"] + 1)


# --- expiry bounds the time until the network first records the nonce, not the time in a queue -----

def test_a_task_recorded_when_sent_is_accepted_after_waiting_past_its_expiry(
    key: nacl.signing.SigningKey, verifier: Verifier, fake_redis: Any
) -> None:
    # Given an envelope with a 60 s lifetime that the scheduler recorded as it sent it
    task_id = new_id()
    env = envelope(key, task_id, ttl=60)
    assert record_sent(fake_redis, env, window=3600, now=env["issued_at"])
    # When a worker first takes it from the queue 10 minutes after it expired
    late = env["expires_at"] + 600
    # Then it is accepted, as the first delivery; a later copy is not the first
    assert verify(verifier, env, task_id, now=late).first_delivery is True
    assert verify(verifier, env, task_id, now=late + 1).first_delivery is False


def test_a_task_nobody_recorded_before_its_expiry_is_refused(key: nacl.signing.SigningKey, verifier: Verifier,
                                                              fake_redis: Any) -> None:
    # Given an envelope nobody recorded (sent without submit(), never delivered)
    task_id = new_id()
    env = envelope(key, task_id, ttl=60)
    # When a worker first sees it after its expiry, Then it is refused, and no record is made for it
    with pytest.raises(InvalidSignature, match=r"expired \d+s ago, before this network first saw it"):
        verify(verifier, env, task_id, now=env["expires_at"] + 1)
    assert fake_redis.get(keys.nonce(env["key_id"], env["nonce"])) is None


def test_a_record_made_after_the_expiry_does_not_make_an_envelope_valid(
    key: nacl.signing.SigningKey, verifier: Verifier, fake_redis: Any
) -> None:
    # Given a record of the envelope written after it expired (by whoever can write Redis)
    task_id = new_id()
    env = envelope(key, task_id, ttl=60)
    assert record_sent(fake_redis, env, window=3600, now=env["expires_at"] + 5)
    # Then the envelope is refused as expired
    with pytest.raises(InvalidSignature, match=r"expired 5s before this network first saw it"):
        verify(verifier, env, task_id, now=env["expires_at"] + 10)


def test_an_envelope_older_than_the_replay_window_is_refused_even_when_recorded(
    key: nacl.signing.SigningKey, fake_redis: Any
) -> None:
    # Given a worker keeping nonces for 600 + 400 s, and a recorded envelope
    verifier = Verifier([peer_id(key.verify_key)], fake_redis, max_age=600, remember_s=400)
    task_id = new_id()
    env = envelope(key, task_id, ttl=60)
    assert record_sent(fake_redis, env, window=1000, now=env["issued_at"])
    # Then the record outlives every moment the worker would accept the envelope
    assert fake_redis.ttl(keys.nonce(env["key_id"], env["nonce"])) > 1000
    assert verify(verifier, env, task_id, now=env["issued_at"] + 1000).first_delivery
    # ... and past the window the envelope is refused whatever Redis says
    with pytest.raises(InvalidSignature, match="cannot be told from a replay"):
        verify(verifier, env, task_id, now=env["issued_at"] + 1001)


def test_replay_window_covers_the_longest_validity_and_every_way_a_copy_comes_back() -> None:
    from hypha_celery.config import parse_config

    config = parse_config({"worker": {"task_timeout": 100, "security": {"max_envelope_age": 900},
                                      "admission": {"max_wait": 50}}})
    window = replay_window(config)
    assert window == 900 + 50 + config.visibility_timeout + config.hard_time_limit
    assert window > 900 + 50 + 2 * 100


def test_record_sent_refuses_a_reused_nonce(key: nacl.signing.SigningKey, fake_redis: Any) -> None:
    env = envelope(key, new_id())
    assert record_sent(fake_redis, env, window=600) is True
    assert record_sent(fake_redis, {**env, "id": new_id()}, window=600) is False


def test_a_recorded_nonce_is_refused_for_another_task(key: nacl.signing.SigningKey, verifier: Verifier,
                                                     fake_redis: Any) -> None:
    first_id, second_id = new_id(), new_id()
    first = envelope(key, first_id)
    assert record_sent(fake_redis, first, window=3600)
    second = envelope(key, second_id)
    second["nonce"] = first["nonce"]
    with pytest.raises(InvalidSignature, match=f"replayed nonce: already used by task {first_id}"):
        verify(verifier, resign(key, second), second_id)


# --- a finished task's nonce ---------------------------------------------------------------------------

def test_a_finished_tasks_envelope_says_so_on_every_later_delivery(key: nacl.signing.SigningKey,
                                                                   verifier: Verifier) -> None:
    # Given a task that ran and finished
    task_id = new_id()
    env = envelope(key, task_id)
    assert verify(verifier, env, task_id).finished is False
    verifier.mark_finished(env["key_id"], env["nonce"], task_id)
    # When the same message comes again, Then the verifier reports it finished
    again = verify(verifier, env, task_id)
    assert again.finished is True and again.first_delivery is False


def test_mark_finished_for_another_task_id_changes_nothing(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    verify(verifier, env, task_id)
    verifier.mark_finished(env["key_id"], env["nonce"], "someone-else")
    verifier.mark_finished(env["key_id"], "no-such-nonce", task_id)
    assert verify(verifier, env, task_id).finished is False


def test_marking_finished_keeps_the_records_expiry(key: nacl.signing.SigningKey, verifier: Verifier,
                                                  fake_redis: Any) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    verify(verifier, env, task_id)
    stored = keys.nonce(env["key_id"], env["nonce"])
    before = fake_redis.ttl(stored)
    verifier.mark_finished(env["key_id"], env["nonce"], task_id)
    assert NonceRecord.loads(fake_redis.get(stored)).done
    assert before - 2 <= fake_redis.ttl(stored) <= before


def test_a_record_from_an_older_worker_still_allows_redelivery(key: nacl.signing.SigningKey, verifier: Verifier,
                                                               fake_redis: Any) -> None:
    # Given the nonce record an older worker wrote: the bare task id
    task_id = new_id()
    env = envelope(key, task_id)
    fake_redis.set(keys.nonce(env["key_id"], env["nonce"]), task_id, ex=600)
    # Then a redelivery is accepted as before, and another task id is a replay
    assert verify(verifier, env, task_id).first_delivery is False
    other_id = new_id()
    other = envelope(key, other_id)
    fake_redis.set(keys.nonce(other["key_id"], other["nonce"]), task_id, ex=600)
    with pytest.raises(InvalidSignature, match=f"replayed nonce: already used by task {task_id}"):
        verify(verifier, other, other_id)


def test_issued_in_the_future_beyond_skew(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = new_id()
    env = envelope(key, task_id, now=time.time() + CLOCK_SKEW_S + 120)
    with pytest.raises(InvalidSignature, match="in the future"):
        verify(verifier, env, task_id)


def test_issued_slightly_in_the_future_within_skew(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = new_id()
    env = envelope(key, task_id, now=time.time() + CLOCK_SKEW_S / 2)
    assert verify(verifier, env, task_id).first_delivery


def test_validity_longer_than_max_age(key: nacl.signing.SigningKey, fake_redis: Any) -> None:
    verifier = Verifier([peer_id(key.verify_key)], fake_redis, max_age=600)
    task_id = new_id()
    with pytest.raises(InvalidSignature, match="longer than this worker accepts"):
        verify(verifier, envelope(key, task_id, ttl=601), task_id)
    task_id = new_id()
    assert verify(verifier, envelope(key, task_id, ttl=600), task_id).first_delivery


@pytest.mark.parametrize(
    ("issued", "expires"),
    [("now", "later"), (100.0, 100.0), (200.0, 100.0), (None, 100.0), (True, 2.0)],
)
def test_invalid_validity_window(key: nacl.signing.SigningKey, verifier: Verifier, issued: Any, expires: Any) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    env["issued_at"], env["expires_at"] = issued, expires
    with pytest.raises(InvalidSignature, match=r"issued_at / expires_at are invalid|expired"):
        verify(verifier, resign(key, env), task_id)


def test_replayed_nonce_for_another_task(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    first_id = new_id()
    first = envelope(key, first_id)
    assert verify(verifier, first, first_id).first_delivery
    # a second, validly signed envelope for another task that reuses the nonce
    second_id = new_id()
    second = envelope(key, second_id)
    second["nonce"] = first["nonce"]
    second = resign(key, second)
    with pytest.raises(InvalidSignature, match=f"replayed nonce: already used by task {first_id}"):
        verify(verifier, second, second_id)


def test_redelivery_of_the_same_envelope_is_allowed(key: nacl.signing.SigningKey, verifier: Verifier) -> None:
    task_id = new_id()
    env = envelope(key, task_id)
    assert verify(verifier, env, task_id).first_delivery is True
    again = verify(verifier, dict(env), task_id)
    assert again.first_delivery is False
    assert again.nonce == env["nonce"]
    assert verify(verifier, env, task_id).first_delivery is False


def test_nonces_are_per_key(key: nacl.signing.SigningKey, fake_redis: Any) -> None:
    other = nacl.signing.SigningKey.generate()
    verifier = Verifier([peer_id(key.verify_key), peer_id(other.verify_key)], fake_redis)
    one_id, two_id = new_id(), new_id()
    one = envelope(key, one_id)
    two = envelope(other, two_id)
    two["nonce"] = one["nonce"]
    two = resign(other, two)
    assert verify(verifier, one, one_id).first_delivery
    assert verify(verifier, two, two_id).first_delivery


def test_without_redis_every_delivery_is_first(key: nacl.signing.SigningKey) -> None:
    verifier = Verifier([peer_id(key.verify_key)], None)
    task_id = new_id()
    env = envelope(key, task_id)
    assert verify(verifier, env, task_id).first_delivery
    assert verify(verifier, env, task_id).first_delivery


@pytest.mark.parametrize("allowed", [[], ()])
def test_empty_allowed_list_rejects_everything(key: nacl.signing.SigningKey, fake_redis: Any, allowed: Any) -> None:
    verifier = Verifier(allowed, fake_redis)
    for signer in (key, nacl.signing.SigningKey.generate()):
        task_id = new_id()
        with pytest.raises(InvalidSignature, match="allows no scheduler keys"):
            verify(verifier, envelope(signer, task_id), task_id)


def test_key_rotation(fake_redis: Any) -> None:
    old, new, third = (nacl.signing.SigningKey.generate() for _ in range(3))
    # allowed as a peer id and as a base64 public key
    verifier = Verifier([peer_id(old.verify_key), base64.b64encode(bytes(new.verify_key)).decode()], fake_redis)
    for signer in (old, new):
        task_id = new_id()
        verified = verify(verifier, envelope(signer, task_id), task_id)
        assert verified.key_id == peer_id(signer.verify_key) and verified.first_delivery
    task_id = new_id()
    with pytest.raises(InvalidSignature, match="not in this worker's allowed_schedulers"):
        verify(verifier, envelope(third, task_id), task_id)
    hexed = Verifier([bytes(third.verify_key).hex()], fake_redis)
    assert verify(hexed, envelope(third, task_id), task_id).first_delivery


@pytest.mark.parametrize("issued", [1e16, 9e15])
def test_envelope_issued_absurdly_far_in_the_future(key: nacl.signing.SigningKey, verifier: Verifier, issued: float) -> None:
    # validly signed by an allowed key, a 300 s window in the year ~3e8: refused as an envelope
    # problem (InvalidSignature), not as a Redis error from storing its nonce
    task_id = new_id()
    env = envelope(key, task_id, now=issued, ttl=300)
    with pytest.raises(InvalidSignature, match=r"in the future|invalid"):
        verify(verifier, env, task_id)


def test_a_redis_outage_at_the_nonce_check_is_not_a_bad_signature(key: nacl.signing.SigningKey) -> None:
    # Given a verifier whose nonce store (Redis) is down
    server = fakeredis.FakeServer()
    server.connected = False
    verifier = Verifier([peer_id(key.verify_key)], fakeredis.FakeRedis(server=server))
    task_id = new_id()
    # When a validly signed envelope arrives, Then the outage is RegistryUnavailable, not InvalidSignature
    with pytest.raises(RegistryUnavailable, match="cannot check the envelope nonce"):
        verify(verifier, envelope(key, task_id), task_id)


def test_the_package_keeps_exporting_the_split_modules_names() -> None:
    # Given the signing side and the verifying side in modules of their own
    import hypha_celery.security as security
    from hypha_celery.security import envelope as envelope_module
    from hypha_celery.security import verifier as verifier_module

    # Then every public name of both is still importable from hypha_celery.security
    for module in (envelope_module, verifier_module):
        for name in module.__all__:
            assert getattr(security, name) is getattr(module, name), name
        assert set(module.__all__) <= set(security.__all__)
