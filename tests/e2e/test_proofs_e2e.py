"""Checkable generations through real workers: hypha.generate(proof=True) on one, hypha.verify on another."""

from __future__ import annotations

import os
from typing import Any

from hypha_celery import keys
from hypha_celery.models.examples import TINY_LLAMA
from tests.conftest import wait_for

SMALL = {"cpu_cores": 1, "memory": "1GB"}
PROMPT = "The cat sat on"


def _send(app: Any, task: str, worker: Any, **kwargs: object) -> dict[str, Any]:
    queue = keys.worker_queue(f"{worker.name}@{os.uname().nodename}")
    return app.send_task(task, kwargs={"model": TINY_LLAMA, "requirements": SMALL, **kwargs}, queue=queue).get(
        timeout=120)


def test_a_proof_made_on_one_worker_is_accepted_by_another(start_worker, celery_client) -> None:
    # Given two workers holding the tiny Llama
    prover, verifier = start_worker(), start_worker()
    app = celery_client()
    wait_for(lambda: len(app.control.ping(timeout=0.5)) == 2, 20, "both workers")
    # When one generates 40 tokens with a proof, and the other verifies it against the prompt the client sent
    generated = _send(app, "hypha.generate", prover, prompt=PROMPT, max_new_tokens=40, proof=True)
    proof = generated["output"]["proof"]
    checked = _send(app, "hypha.verify", verifier, prompt=PROMPT, proof=proof)
    # Then the proof names the model and its manifest, covers the 40 tokens in 2 x 258 bytes, and is accepted
    # by the other worker
    assert proof["model"] == TINY_LLAMA and proof["manifest_sha256"] == checked["metrics"]["manifest_sha256"]
    assert len(proof["tokens"]) == generated["output"]["usage"]["completion_tokens"] == 40
    assert len(proof["commitments"]) * 3 // 4 == 2 + 2 * 128 + 2 + 2 * 32  # a full chunk, then 8 tokens x 4 values
    assert checked["worker"] != generated["worker"]
    assert checked["output"]["accepted"] is True, checked["output"]


def test_a_tampered_proof_is_rejected_by_the_verifier(start_worker, celery_client) -> None:
    # Given a worker, and a generation's proof
    worker = start_worker()
    app = celery_client()
    proof = _send(app, "hypha.generate", worker, prompt=PROMPT, max_new_tokens=40, proof=True)["output"]["proof"]
    tokens = list(proof["tokens"])
    tokens[3] = (tokens[3] + 7) % 200
    # When the verifier gets it with one token changed, with another prompt, or naming another manifest
    changed = _send(app, "hypha.verify", worker, prompt=PROMPT, proof={**proof, "tokens": tokens})["output"]
    prompt = _send(app, "hypha.verify", worker, prompt="The dog sat on", proof=proof)["output"]
    manifest = _send(app, "hypha.verify", worker, prompt=PROMPT, proof={**proof, "manifest_sha256": "0" * 64})["output"]
    # Then each is rejected, and the last names the manifest
    assert (changed["accepted"], prompt["accepted"], manifest["accepted"]) == (False, False, False)
    assert "manifest" in manifest["reason"]
