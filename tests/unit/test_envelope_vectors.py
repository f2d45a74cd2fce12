"""The committed envelope test vectors (``docs/envelope-vectors/``) and the RFC 8785 canonical form.

Each vector is reproduced byte for byte from its inputs with the public signing API, its signature
verifies against the key its key id names, and the worker's verifier accepts it; the refused
vectors are refused on both sides. The Node example checks the same files independently.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import fakeredis
import nacl.exceptions
import nacl.signing
import pytest

from hypha_celery.errors import InvalidSignature
from hypha_celery.harness import envelope_vectors
from hypha_celery.security import (
    ATTESTATION,
    ENVELOPE_VERSION,
    attest,
    body_digest,
    canonical,
    peer_id,
    public_key_from_id,
    request_digest,
    sign_envelope,
    verify_result,
)
from hypha_celery.security.strict_json import duplicate_key
from hypha_celery.security.verifier import Verifier
from tests.conftest import ROOT

VECTORS = ROOT / "docs" / "envelope-vectors"
KINDS = {p: json.loads(p.read_text()).get("kind", "envelope") for p in VECTORS.glob("*.json")}
SIGNED = sorted(p for p, kind in KINDS.items() if kind == "envelope" and not json.loads(p.read_text()).get("refused"))
REFUSED = sorted(p for p, kind in KINDS.items() if kind == "envelope" and json.loads(p.read_text()).get("refused"))
RESULTS = sorted(p for p, kind in KINDS.items() if kind == "result")
DUPLICATES = sorted(p for p, kind in KINDS.items() if kind == "duplicate-key")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_the_vectors_cover_what_the_spec_promises() -> None:
    # Given the committed files, Then there are signed and refused ones, and the signed bodies hold the hard cases
    assert len(SIGNED) >= 8 and len(REFUSED) >= 2 and len(RESULTS) >= 2 and len(DUPLICATES) >= 1
    bodies = "".join(load(p)["body_canonical"] for p in SIGNED)
    for printed in ("1e-7", "1e+21", ",0,", "0.1", "9007199254740991", "\u65e5", "\\u0000", "{}", "[]"):
        assert printed in bodies, printed


@pytest.mark.parametrize("path", SIGNED, ids=lambda p: p.stem)
def test_a_vector_is_reproduced_byte_for_byte(path: Path) -> None:
    # Given a vector's inputs
    vec = load(path)
    key = nacl.signing.SigningKey(bytes.fromhex(vec["seed_hex"]))
    # When this implementation signs them
    env = sign_envelope(key, task_name=vec["task"], task_id=vec["task_id"], args=vec["args"], kwargs=vec["kwargs"],
                        ttl=vec["expires_at"] - vec["issued_at"], now=vec["issued_at"], nonce=vec["nonce"],
                        model_sha256=vec["model_sha256"])
    # Then every intermediate value is the committed one
    body = canonical({"args": vec["args"], "kwargs": vec["kwargs"]})
    assert body == bytes.fromhex(vec["body_canonical_hex"]) == vec["body_canonical"].encode()
    assert body_digest(vec["args"], vec["kwargs"]) == hashlib.sha256(body).hexdigest() == vec["body_sha256"]
    unsigned = {field: value for field, value in env.items() if field != "signature"}
    assert canonical(unsigned) == bytes.fromhex(vec["envelope_canonical_hex"]) == vec["envelope_canonical"].encode()
    assert env == vec["envelope"] and env["v"] == ENVELOPE_VERSION
    assert env["signature"] == vec["signature"] and base64.b64decode(env["signature"]).hex() == vec["signature_hex"]
    assert peer_id(key.verify_key) == vec["key_id"] and bytes(key.verify_key).hex() == vec["public_key_hex"]


@pytest.mark.parametrize("path", SIGNED, ids=lambda p: p.stem)
def test_a_vector_verifies_from_its_key_id_alone(path: Path) -> None:
    # Given only the key id and the committed bytes
    vec = load(path)
    verify_key = nacl.signing.VerifyKey(public_key_from_id(vec["key_id"]))
    # Then the signature checks out over the canonical envelope
    verify_key.verify(bytes.fromhex(vec["envelope_canonical_hex"]), bytes.fromhex(vec["signature_hex"]))
    # ... and the worker's verifier accepts the envelope for the message it describes
    verifier = Verifier([vec["key_id"]], fakeredis.FakeRedis(), max_age=3600)
    verified = verifier.verify(vec["envelope"], task_name=vec["task"], task_id=vec["task_id"], args=vec["args"],
                               kwargs=vec["kwargs"], now=vec["issued_at"])
    assert verified.key_id == vec["key_id"] and verified.model_sha256 == vec["model_sha256"]


@pytest.mark.parametrize("path", SIGNED, ids=lambda p: p.stem)
def test_one_changed_byte_breaks_a_vector(path: Path) -> None:
    # Given a vector's envelope bytes with one character changed
    vec = load(path)
    verify_key = nacl.signing.VerifyKey(public_key_from_id(vec["key_id"]))
    altered = vec["envelope_canonical"].replace('"v":2', '"v":3').encode()
    assert altered != vec["envelope_canonical"].encode()
    # Then the signature does not verify
    with pytest.raises(nacl.exceptions.BadSignatureError):
        verify_key.verify(altered, bytes.fromhex(vec["signature_hex"]))


@pytest.mark.parametrize("path", REFUSED, ids=lambda p: p.stem)
def test_a_refused_vector_cannot_be_signed_or_verified(path: Path) -> None:
    vec = load(path)
    key = nacl.signing.SigningKey(bytes.fromhex(envelope_vectors.SEED_HEX))
    # When a scheduler tries to sign the body, Then it is refused before anything is sent
    with pytest.raises(ValueError, match=r"safe integer|UTF-8"):
        sign_envelope(key, task_name="hypha.infer", task_id="t", args=vec["args"], kwargs=vec["kwargs"])
    # ... and a worker given such a body under a valid envelope refuses it with the reason
    env = sign_envelope(key, task_name="hypha.infer", task_id="t", kwargs={"model": "mlp"})
    verifier = Verifier([peer_id(key.verify_key)], None)
    with pytest.raises(InvalidSignature, match="no RFC 8785 canonical form"):
        verifier.verify(env, task_name="hypha.infer", task_id="t", args=vec["args"], kwargs=vec["kwargs"])


def test_the_committed_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    # Given the generator, When it checks the committed directory, Then nothing is out of date
    assert envelope_vectors.main(["--check", str(VECTORS)]) == 0
    # ... and a file that drifted is reported
    for name, data in envelope_vectors.vectors():
        (tmp_path / f"{name}.json").write_text(envelope_vectors.render(data))
    (tmp_path / "02-floats.json").write_text((VECTORS / "02-floats.json").read_text().replace("1e-07", "1e-7"))
    assert envelope_vectors.main(["--check", str(tmp_path)]) == 1


def test_jcs_prints_numbers_as_ecmascript_does_not_as_python() -> None:
    # Given values where Python's json.dumps and RFC 8785 disagree, Then the canonical form is RFC 8785's
    assert canonical([1e-7, 1e21, -0.0, 1.0, 1e-6, 2.5e-5]) == b"[1e-7,1e+21,0,1,0.000001,0.000025]"
    assert json.dumps([1e-7, 1e21, -0.0, 1.0]) == "[1e-07, 1e+21, -0.0, 1.0]"
    assert canonical({"\ufb00": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ufb00":1}'.encode()
    assert canonical("\u00e9\n") == b'"\xc3\xa9\\n"'
    # ... and what JCS cannot express is refused, not approximated
    for bad in (2**53, -(2**53), float("nan"), float("inf"), {1: "int key"}, b"bytes"):
        with pytest.raises(ValueError):
            canonical(bad)
    assert canonical([2**53 - 1, -(2**53 - 1)]) == b"[9007199254740991,-9007199254740991]"


def test_a_version_1_envelope_is_refused_naming_version_2() -> None:
    # Given an envelope signed the old way (v1, Python's json.dumps) by an allowed key
    key = nacl.signing.SigningKey(bytes.fromhex(envelope_vectors.SEED_HEX))
    env = sign_envelope(key, task_name="hypha.infer", task_id="t1", kwargs={"model": "mlp", "inputs": [[1e-7]]})
    unsigned = {**{k: v for k, v in env.items() if k != "signature"}, "v": 1}
    old = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    env = {**unsigned, "signature": base64.b64encode(key.sign(old).signature).decode()}
    verifier = Verifier([peer_id(key.verify_key)], None)
    # When a worker checks it, Then it is refused with the version it speaks and the way to upgrade
    with pytest.raises(InvalidSignature, match=r"version 1 .* no longer accepted.* v2 envelopes, canonicalized by RFC 8785"):
        verifier.verify(env, task_name="hypha.infer", task_id="t1", args=[], kwargs={"model": "mlp", "inputs": [[1e-7]]})
    # ... and a version that is not an integer 2 (True, 2.0, "2") is refused too
    for version in (True, 2.0, "2"):
        with pytest.raises(InvalidSignature, match="unknown envelope version"):
            verifier.verify({**env, "v": version}, task_name="hypha.infer", task_id="t1", args=[], kwargs={})


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_a_result_vector_is_reproduced_and_verifies(path: Path) -> None:
    # Given a result vector's inputs, When this implementation signs the result as a worker does
    vec = load(path)
    key = nacl.signing.SigningKey(bytes.fromhex(vec["seed_hex"]))
    signed = attest(key, vec["result"], task_id=vec["task_id"], task_name=vec["task"], worker=vec["worker"],
                    envelope=vec["request"])
    # Then every intermediate value is the committed one
    assert canonical(vec["result"]).decode() == vec["result_canonical"]
    assert hashlib.sha256(vec["result_canonical"].encode()).hexdigest() == vec["result_sha256"]
    assert request_digest(vec["request"]) == vec["request_sha256"]
    if vec["request"] is not None:
        assert hashlib.sha256(vec["request_canonical"].encode()).hexdigest() == vec["request_sha256"]
    statement = {k: v for k, v in signed[ATTESTATION].items() if k != "signature"}
    assert canonical(statement) == bytes.fromhex(vec["statement_canonical_hex"]) == vec["statement_canonical"].encode()
    assert signed == vec["signed_result"] and signed[ATTESTATION]["signature"] == vec["signature"]
    # ... and a scheduler verifies the committed signed result from its peer id alone, against its own request
    assert verify_result(vec["signed_result"], vec["task_id"], allowed=[vec["peer"]], request_digest=vec["request_sha256"],
                         task_name=vec["task"]) == vec["peer"] == peer_id(key.verify_key)


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_a_result_vector_with_its_output_changed_fails(path: Path) -> None:
    vec = load(path)
    changed = {**vec["signed_result"], "output": [[1.0]]}
    with pytest.raises(InvalidSignature, match="changed after worker"):
        verify_result(changed, vec["task_id"])


@pytest.mark.parametrize("path", DUPLICATES, ids=lambda p: p.stem)
def test_a_duplicate_key_vector_is_found_where_pythons_reader_would_keep_the_signed_value(path: Path) -> None:
    vec = load(path)
    # Given JSON that names a key twice, the signed value last: Python's reader alone would accept it
    envelope = json.loads(vec["envelope_json"])
    verifier = Verifier([vec["key_id"]], fakeredis.FakeRedis(), max_age=3600)
    verifier.verify(envelope, task_name=envelope["task"], task_id=envelope["id"], args=[],
                    kwargs={"model": "mlp", "inputs": [[5.1, 3.5, 1.4, 0.2]]}, now=envelope["issued_at"])
    # Then the strict reader names the repeated key in both, so the worker refuses them
    assert duplicate_key(vec["body_json"]) == vec["body_duplicate"]
    assert duplicate_key(vec["envelope_json"]) == vec["envelope_duplicate"]
