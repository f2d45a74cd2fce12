"""Results a scheduler can tell from forgeries, and JSON with one meaning, through a real worker and Redis.

* A hypha task's stored result carries the answering worker's signature (its identity, whose peer
  id is in the registry): it verifies, and names that worker; a result rewritten in the backend,
  or stored there by anyone else, fails with ``InvalidSignature``; a scheduler can require a set
  of allowed workers.
* A message body, or a signed envelope, that names one JSON key twice is refused
  (``MalformedMessage`` / ``InvalidSignature``): Python keeps the last value, other readers the first.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import redis

from hypha_celery.client import HyphaResult, submit
from hypha_celery.errors import InvalidSignature, MalformedMessage
from hypha_celery.harness.launch import worker_env
from hypha_celery.registry import list_workers
from hypha_celery.security import (
    ATTESTATION,
    ENVELOPE_HEADER,
    attest,
    generate_key,
    load_identity,
    peer_id,
    signed_options,
    verify_result,
)
from tests.conftest import ROOT

SMALL = {"cpu_cores": 0.1, "memory": "64MiB"}
IRIS = [[5.1, 3.5, 1.4, 0.2]]


def verifying(key: nacl.signing.SigningKey) -> dict[str, Any]:
    return {"security": {"verify_task_signatures": True, "allowed_schedulers": [peer_id(key.verify_key)]}}


@pytest.fixture
def scheduler_key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def test_a_result_verifies_as_the_workers_whose_peer_id_the_registry_shows(
    start_worker: Callable[..., Any], celery_client: Callable[..., Any], redis_client: redis.Redis,
    scheduler_key: nacl.signing.SigningKey, model_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HYPHA_REGISTRY_URL", redis_url)  # where the client reads the worker's registered identity
    # Given a worker with no identity_key (it makes one beside its store at first start)
    start_worker(verifying(scheduler_key))
    app = celery_client()
    [record] = list_workers(redis_client)
    # When a scheduler sends a signed task and asks for a verified answer
    result = submit("hypha.infer", model="mlp", inputs=IRIS, signing_key=scheduler_key, app=app, queue="hypha",
                    verify=True)
    answer = result.get(timeout=60)
    # Then the answer is signed by that worker's identity: the one in its registry record and its key file
    assert result.signer == record["peer_id"] == peer_id(load_identity(None, model_dir).verify_key)
    assert answer[ATTESTATION]["worker"] == answer["worker"] == record["worker_id"]
    # ... and a scheduler that allows only that worker accepts it, one that allows another does not
    assert verify_result(answer, result.id, allowed=[record["peer_id"]]) == record["peer_id"]
    stranger = peer_id(nacl.signing.SigningKey.generate().verify_key)
    refused = submit("hypha.noop", signing_key=scheduler_key, app=app, queue="hypha", requirements=SMALL,
                     allowed_workers=[stranger])
    with pytest.raises(InvalidSignature, match="not among the allowed workers"):
        refused.get(timeout=60)


def test_the_cli_prints_the_worker_that_signed_and_refuses_one_not_allowed(
    start_worker: Callable[..., Any], redis_url: str, redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given a verifying worker and the scheduler's key file
    key_file = tmp_path / "scheduler.key"
    start_worker(verifying(generate_key(key_file)))
    [record] = list_workers(redis_client)
    cli = [sys.executable, "-m", "hypha_celery.cli", "run", "embed", "--model", "tiny-bert-embedder",
           "--key", str(key_file)]
    env = worker_env(redis_url, redis_url, redis_url)
    # When `run embed --verify` runs, Then it prints the answer and, on stderr, the worker that signed it
    out = subprocess.run([*cli, "--verify", "one text"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == "one text"
    assert f"verified: signed by worker {record['worker_id']} ({record['peer_id']})" in out.stderr
    # When only another worker is allowed, Then the answer is refused with the reason
    stranger = peer_id(nacl.signing.SigningKey.generate().verify_key)
    out = subprocess.run([*cli, "--allow-worker", stranger, "one text"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=env)
    assert out.returncode == 1 and "InvalidSignature" in out.stderr and "not among the allowed workers" in out.stderr
    assert out.stdout == ""


def test_a_result_changed_or_planted_in_the_backend_fails_verification(
    start_worker: Callable[..., Any], celery_client: Callable[..., Any], redis_client: redis.Redis,
    scheduler_key: nacl.signing.SigningKey, redis_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HYPHA_REGISTRY_URL", redis_url)  # where the client reads the worker's registered identity
    # Given a worker's genuine, signed answer
    start_worker(verifying(scheduler_key))
    app = celery_client()
    genuine = submit("hypha.infer", model="mlp", inputs=IRIS, signing_key=scheduler_key, app=app, queue="hypha")
    answer = genuine.get(timeout=60)
    assert verify_result(answer, genuine.id)
    # When someone with write access to the result backend rewrites its output
    key = app.backend.get_key_for_task(genuine.id)
    meta = json.loads(redis_client.get(key) or b"")
    meta["result"]["output"] = [[0.0, 0.0, 1.0]]
    redis_client.set(key, json.dumps(meta))
    # Then a verified read refuses it, naming the change
    rewritten = HyphaResult(genuine.id, app=app)
    with pytest.raises(InvalidSignature, match="changed after worker"):
        rewritten.get(timeout=10, verify=True)
    # When they store a result of their own under a task id
    planted_id = str(uuid.uuid4())
    app.backend.store_result(planted_id, {k: v for k, v in answer.items() if k != ATTESTATION}, "SUCCESS")
    with pytest.raises(InvalidSignature, match="no attestation"):
        HyphaResult(planted_id, app=app).get(timeout=10, verify=True)
    # ... or copy the genuine signed answer under another task id
    copied_id = str(uuid.uuid4())
    app.backend.store_result(copied_id, answer, "SUCCESS")
    with pytest.raises(InvalidSignature, match="signed for task id"):
        HyphaResult(copied_id, app=app).get(timeout=10, verify=True)
    # ... or re-sign a changed answer with a key of their own, copying everything the genuine attestation binds
    stated = answer[ATTESTATION]
    forged = attest(nacl.signing.SigningKey.generate(), {**answer, "output": [[0.0, 0.0, 1.0]]},
                    task_id=genuine.id, task_name=stated["task"], worker=stated["worker"],
                    request_sha256=stated["request_sha256"])
    meta["result"] = forged
    redis_client.set(key, json.dumps(meta))
    # Then it verifies only as the stranger's key, which is not the identity the worker registered
    with pytest.raises(InvalidSignature, match="not among the allowed workers"):
        HyphaResult(genuine.id, app=app).get(timeout=10, verify=True)
    # ... and wait(), Celery's other name for get(), checks it too
    with pytest.raises(InvalidSignature, match="not among the allowed workers"):
        HyphaResult(genuine.id, app=app).wait(timeout=10, verify=True)


def push_raw(client: redis.Redis, app: Any, *, headers: str, body: bytes, task_id: str) -> None:
    """LPUSH a transport message onto the shared queue as kombu's Redis transport would, ``headers`` as raw JSON."""
    properties = {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2, "priority": 0,
                  "delivery_info": {"exchange": "", "routing_key": "hypha"}, "body_encoding": "base64",
                  "delivery_tag": str(uuid.uuid4())}
    raw = ('{"body": "' + base64.b64encode(body).decode() + '", "content-encoding": "utf-8", '
           '"content-type": "application/json", "headers": ' + headers + ', "properties": ' + json.dumps(properties) + "}")
    client.lpush("hypha", raw)


def celery_headers(app: Any, task_id: str, kwargs: dict[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
    template = app.amqp.as_task_v2(task_id, "hypha.infer", args=(), kwargs=kwargs)
    return {**template.headers, ENVELOPE_HEADER: envelope}


def test_a_body_or_an_envelope_naming_a_key_twice_is_refused(
    start_worker: Callable[..., Any], celery_client: Callable[..., Any], redis_client: redis.Redis,
    scheduler_key: nacl.signing.SigningKey,
) -> None:
    # Given a verifying worker, and a task whose envelope is validly signed over its kwargs
    start_worker(verifying(scheduler_key))
    app = celery_client()
    kwargs = {"model": "mlp", "inputs": IRIS}
    signed = signed_options(scheduler_key, "hypha.infer", kwargs=kwargs)
    task_id = signed["task_id"]
    headers = celery_headers(app, task_id, kwargs, signed["headers"][ENVELOPE_HEADER])
    # When the body names "inputs" twice, the signed value last (what Python keeps; another reader keeps the first)
    body = b'[[], {"model": "mlp", "inputs": [[9.0, 9.0, 9.0, 9.0]], "inputs": [[5.1, 3.5, 1.4, 0.2]]}, {}]'
    push_raw(redis_client, app, headers=json.dumps(headers), body=body, task_id=task_id)
    # Then it is refused as malformed, before anything runs
    with pytest.raises(MalformedMessage, match="'inputs' twice"):
        app.AsyncResult(task_id).get(timeout=60)

    # When the envelope names "nonce" twice, the signed value last
    signed = signed_options(scheduler_key, "hypha.infer", kwargs=kwargs)
    task_id = signed["task_id"]
    text = json.dumps(celery_headers(app, task_id, kwargs, signed["headers"][ENVELOPE_HEADER]))
    text = text.replace('"nonce": ', '"nonce": "00000000000000000000000000000000", "nonce": ', 1)
    push_raw(redis_client, app, headers=text, body=json.dumps([[], kwargs, {}]).encode(), task_id=task_id)
    # Then the envelope is refused as a bad signature, naming the key
    with pytest.raises(InvalidSignature, match=r"twice \(hypha_envelope: nonce\)"):
        app.AsyncResult(task_id).get(timeout=60)

    # ... while the same message without the duplicate runs, signed by the worker
    signed = signed_options(scheduler_key, "hypha.infer", kwargs=kwargs)
    task_id = signed["task_id"]
    text = json.dumps(celery_headers(app, task_id, kwargs, signed["headers"][ENVELOPE_HEADER]))
    push_raw(redis_client, app, headers=text, body=json.dumps([[], kwargs, {}]).encode(), task_id=task_id)
    assert verify_result(app.AsyncResult(task_id).get(timeout=60), task_id)
