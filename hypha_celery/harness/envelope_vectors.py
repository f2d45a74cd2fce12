"""Test vectors for the signed envelope and the signed result (``docs/envelope-vectors/``): write or check them.

``python -m hypha_celery.harness.envelope_vectors`` rewrites the files from the cases below with this
implementation (:func:`hypha_celery.security.sign_envelope`); ``--check`` exits 1 if any committed
file differs from what it would write. ``tests/unit/test_envelope_vectors.py`` proves the same, and
``examples/node-scheduler/verify-vectors.mjs`` checks the files with an independent implementation.
The spec they illustrate is ``docs/envelope.md``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing

from hypha_celery.security.attestation import ATTESTATION, attest, request_digest
from hypha_celery.security.envelope import body_digest, canonical, peer_id, sign_envelope

__all__ = ["CASES", "DUPLICATES", "REFUSED", "RESULTS", "VECTOR_DIR", "duplicate_vector", "main", "refused_vector",
           "result_vector", "vector", "vectors"]

VECTOR_DIR = Path(__file__).resolve().parents[2] / "docs" / "envelope-vectors"
SEED_HEX = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"  # RFC 8032 7.1 test 1
OTHER_SEED_HEX = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"  # RFC 8032 7.1 test 2
ISSUED_AT = 1767225600.25  # 2026-01-01T00:00:00.25Z
TTL = 300.0
IRIS = [[5.1, 3.5, 1.4, 0.2]]
PIN = "e59625a822490d2d4f6b0b15a2ec1bd2c1cd2dd1b9bc0b3b7d2e8a9d0c6f1a2b"
WORKER_SEED_HEX = "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7"  # RFC 8032 7.1 test 3

# name -> (description, seed hex, task, task id, args, kwargs, model_sha256)
CASES: dict[str, tuple[str, str, str, str, list[Any], dict[str, Any], str | None]] = {
    "01-infer-iris": (
        "the Node example's task: hypha.infer on the built-in mlp, no requirements (null in the envelope)",
        SEED_HEX, "hypha.infer", "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0001", [], {"model": "mlp", "inputs": IRIS}, None,
    ),
    "02-floats": (
        "numbers as ECMAScript prints them: 1e-7, 1e+21, -0.0 as 0, 0.1, the extremes, 0.000001, 0.00003",
        SEED_HEX, "hypha.infer", "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0002", [],
        {"model": "mlp", "inputs": [[1e-7, 1e21, -0.0, 0.1], [5e-324, 1.7976931348623157e308, 1e-6, 3e-5],
                                    [0.30000000000000004, 123456789.125, 1.0, -2.5]]},
        None,
    ),
    "03-integers": (
        "integers up to +-(2**53 - 1) are numbers; a larger one travels as a string (see 90-refused-big-integer)",
        SEED_HEX, "hypha.infer", "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0003", [],
        {"model": "mlp", "inputs": [[0, -1, 9007199254740991, -9007199254740991]], "big": "9007199254740993",
         "requirements": {"cpu_cores": 2, "memory": "1GB"}},
        None,
    ),
    "04-strings": (
        "non-ASCII in UTF-8 as is; only \" \\ and controls below U+0020 escaped (\\b \\f \\n \\r \\t, else \\u00xx)",
        SEED_HEX, "hypha.infer", "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0004", [],
        {"model": "mlp", "inputs": IRIS,
         "tags": ["h\u00e9llo w\u00f6rld", "\u65e5\u672c\u8a9e", "\U0001f600", "\u2028\u2029", "\u0000\u0001\u001f\u007f",
                  "\"\\/\b\f\n\r\t", "</script>", "\u20ac100"]},
        None,
    ),
    "05-key-order": (
        "object keys sorted by UTF-16 code units, at every depth: U+1F600 (D83D DE00) sorts before U+FB00",
        SEED_HEX, "hypha.infer", "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0005", [],
        {"model": "mlp", "inputs": IRIS,
         "meta": {"\ufb00": 2, "\U0001f600": 1, "b": {"z": [], "a": {"y": True, "x": None}}, "a": False, "A": 0,
                  "": "empty key", "\u00e9": 3, "10": "ten", "9": "nine"}},
        None,
    ),
    "06-empty": (
        "empty containers, an empty string, null and booleans",
        SEED_HEX, "hypha.infer", "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0006", [],
        {"model": "mlp", "inputs": [], "options": {}, "nested": [[], {}, [[]], {"e": {}}], "s": "", "n": None,
         "t": True, "f": False},
        None,
    ),
    "07-positional-args": (
        "positional args are hashed too (hypha's tasks take keyword arguments; other tasks may not)",
        OTHER_SEED_HEX, "hypha.noop", "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0007",
        [1, "two", [3.5, -0.0], {"four": None}], {}, None,
    ),
    "08-model-pin": (
        "the optional model_sha256 field, signed with the others when present",
        SEED_HEX, "hypha.infer", "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0008", [], {"model": "mlp", "inputs": IRIS}, PIN,
    ),
}

# name -> (description, args, kwargs): bodies that have no canonical form; a signer must refuse them.
REFUSED: dict[str, tuple[str, list[Any], dict[str, Any]]] = {
    "90-refused-big-integer": (
        "2**53 + 1 is beyond I-JSON's exact integers: JCS cannot print it (JavaScript reads it as 2**53); "
        "send it as a string",
        [], {"model": "mlp", "inputs": [[9007199254740993]]},
    ),
    "91-refused-lone-surrogate": (
        "a string with a lone UTF-16 surrogate is not Unicode text: it has no UTF-8 form to hash",
        [], {"model": "mlp", "inputs": IRIS, "tag": "\ud800"},
    ),
}


# name -> (description, task, task id, the request's envelope vector (None: sent without one), worker, result)
RESULTS: dict[str, tuple[str, str, str, str | None, str, dict[str, Any]]] = {
    "50-result-signed-request": (
        "a worker's answer to 01-infer-iris, signed by the worker's identity: it names that signed request by digest",
        "hypha.infer", "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0001", "01-infer-iris", "w1@node-a",
        {"output": [[0.0215, 0.9132, 0.0653]], "model": "mlp", "worker": "w1@node-a",
         "metrics": {"duration_s": 0.0125, "queue_wait_s": 1e-7, "load_s": 0.0, "memory_peak": 73400320,
                     "device": "cpu", "cache_hit": True, "started_at": 1767225600.5, "finished_at": 1767225600.5125,
                     "pid": 4242, "gpu_utilization": None,
                     "reserved": {"cpu_cores": [0], "cpu_milli": 1000, "memory": 536870912, "gpus": [],
                                  "gpu_memory": {}, "cuda_visible_devices": ""}}},
    ),
    "51-result-unsigned-request": (
        "the answer to a task sent without an envelope (a worker with verify_task_signatures = false): request null",
        "hypha.noop", "7d0b4a3e-0c1f-4a61-9a55-6c3e1f0e0051", None, "w2@node-b",
        {"output": None, "model": None, "worker": "w2@node-b", "metrics": {"duration_s": 0.0, "device": "cpu"}},
    ),
}

# name -> description: JSON that names a key twice (a body, an envelope); a reader must refuse both.
DUPLICATES: dict[str, str] = {
    "92-refused-duplicate-key": (
        "a body and an envelope that name one key twice, the signed value last: Python's json keeps the last, other "
        "readers the first; both are refused (the body: MalformedMessage, the envelope: InvalidSignature)"
    ),
}


def vector(name: str) -> dict[str, Any]:
    """One signed case, with every intermediate value a reimplementation can compare against."""
    description, seed_hex, task, task_id, args, kwargs, pin = CASES[name]
    key = nacl.signing.SigningKey(bytes.fromhex(seed_hex))
    nonce = "00112233445566778899aabbccdd" + name[:2].rjust(4, "0")
    env = sign_envelope(key, task_name=task, task_id=task_id, args=args, kwargs=kwargs, ttl=TTL, now=ISSUED_AT,
                        model_sha256=pin, nonce=nonce)
    body = canonical({"args": args, "kwargs": kwargs})
    signed = canonical({field: value for field, value in env.items() if field != "signature"})
    return {
        "name": name,
        "description": description,
        "seed_hex": seed_hex,
        "public_key_hex": bytes(key.verify_key).hex(),
        "key_id": peer_id(key.verify_key),
        "task": task,
        "task_id": task_id,
        "args": args,
        "kwargs": kwargs,
        "issued_at": ISSUED_AT,
        "expires_at": ISSUED_AT + TTL,
        "nonce": nonce,
        "model_sha256": pin,
        "body_canonical": body.decode(),
        "body_canonical_hex": body.hex(),
        "body_sha256": body_digest(args, kwargs),
        "envelope_canonical": signed.decode(),
        "envelope_canonical_hex": signed.hex(),
        "signature": env["signature"],
        "signature_hex": base64.b64decode(env["signature"]).hex(),
        "envelope": env,
    }


def refused_vector(name: str) -> dict[str, Any]:
    description, args, kwargs = REFUSED[name]
    return {"name": name, "description": description, "args": args, "kwargs": kwargs, "refused": True}


def result_vector(name: str) -> dict[str, Any]:
    """One signed result: the statement's inputs and every intermediate value, as a scheduler recomputes them."""
    description, task, task_id, request_case, worker, result = RESULTS[name]
    key = nacl.signing.SigningKey(bytes.fromhex(WORKER_SEED_HEX))
    request = vector(request_case)["envelope"] if request_case is not None else None
    signed = attest(key, result, task_id=task_id, task_name=task, worker=worker, envelope=request)
    statement = signed[ATTESTATION]
    unsigned = canonical({field: value for field, value in statement.items() if field != "signature"})
    return {
        "name": name,
        "kind": "result",
        "description": description,
        "seed_hex": WORKER_SEED_HEX,
        "public_key_hex": bytes(key.verify_key).hex(),
        "peer": peer_id(key.verify_key),
        "task": task,
        "task_id": task_id,
        "worker": worker,
        "request": request,
        "request_canonical": None if request is None else canonical(  # the bytes the scheduler signed
            {field: value for field, value in request.items() if field != "signature"}).decode(),
        "request_sha256": request_digest(request),
        "result": result,
        "result_canonical": canonical(result).decode(),
        "result_sha256": statement["result_sha256"],
        "statement_canonical": unsigned.decode(),
        "statement_canonical_hex": unsigned.hex(),
        "signature": statement["signature"],
        "signature_hex": base64.b64decode(statement["signature"]).hex(),
        "signed_result": signed,
    }


def duplicate_vector(name: str) -> dict[str, Any]:
    """A body and a signed envelope that each repeat a key, the value that was signed last."""
    signed = vector("01-infer-iris")
    envelope_text = json.dumps(signed["envelope"], separators=(",", ":"))
    envelope_text = envelope_text.replace('"nonce":', '"nonce":"' + "f" * 32 + '","nonce":', 1)
    body_text = '[[],{"model":"mlp","inputs":[[9.0,9.0,9.0,9.0]],"inputs":[[5.1,3.5,1.4,0.2]]},{}]'
    return {"name": name, "kind": "duplicate-key", "refused": True, "description": DUPLICATES[name],
            "key_id": signed["key_id"], "body_json": body_text, "body_duplicate": "inputs",
            "envelope_json": envelope_text, "envelope_duplicate": "nonce"}


def vectors() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in CASES:
        yield name, vector(name)
    for name in RESULTS:
        yield name, result_vector(name)
    for name in REFUSED:
        yield name, refused_vector(name)
    for name in DUPLICATES:
        yield name, duplicate_vector(name)


def render(data: dict[str, Any]) -> str:
    """A vector file's text: indented, ASCII only (escapes keep odd characters visible and intact)."""
    return json.dumps(data, indent=2, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare the committed files instead of writing them")
    parser.add_argument("dir", nargs="?", type=Path, default=VECTOR_DIR)
    options = parser.parse_args(argv)
    stale = []
    for name, data in vectors():
        path = options.dir / f"{name}.json"
        if options.check:
            if not path.exists() or path.read_text() != render(data):
                stale.append(path.name)
        else:
            options.dir.mkdir(parents=True, exist_ok=True)
            path.write_text(render(data))
    if stale:
        print("out of date: " + ", ".join(stale) + " (python -m hypha_celery.harness.envelope_vectors)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
