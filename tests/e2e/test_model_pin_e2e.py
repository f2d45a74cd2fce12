"""Pinning the exact model, through a real worker that verifies signatures.

The scheduler signs ``model_sha256`` (the sha256 of the model's manifest) into
the envelope; a worker whose store holds another manifest under that id refuses
with ``ModelPinMismatch`` before any ML work, and a matching pin runs as usual.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from hypha_celery.client import submit
from hypha_celery.errors import ModelPinMismatch
from hypha_celery.models.store import ModelStore
from hypha_celery.security import generate_key, peer_id
from tests.conftest import ROOT

ROWS = [[5.0, 3.4, 1.5, 0.2]]


def verifying(key: nacl.signing.SigningKey, models: dict[str, Any]) -> dict[str, Any]:
    return {"models": models,
            "security": {"verify_task_signatures": True, "allowed_schedulers": [peer_id(key.verify_key)]}}


def send(app: Any, key: nacl.signing.SigningKey, task: str, pin: str, **kwargs: Any) -> Any:
    return submit(task, signing_key=key, app=app, queue="hypha", model_sha256=pin, **kwargs)


def test_a_matching_pin_runs_and_another_manifest_is_refused(
    start_worker: Callable[..., Any], celery_client: Callable[..., Any], model_dir: Path, tmp_path: Path
) -> None:
    # Given a worker that verifies signatures, with its own copy of the example mlp
    store_dir = tmp_path / "store"
    shutil.copytree(model_dir / "mlp", store_dir / "mlp")
    key = nacl.signing.SigningKey.generate()
    start_worker(verifying(key, {"model_dir": str(store_dir)}))
    app = celery_client()
    held = ModelStore(store_dir).manifest_sha256("mlp")
    other = ModelStore(model_dir).manifest_sha256("cnn")  # a real manifest, of another model
    assert held != other

    # When the scheduler pins the manifest the worker holds, Then the task runs
    ok = send(app, key, "hypha.infer", held, model="mlp", inputs=ROWS).get(timeout=60)
    assert ok["model"] == "mlp" and len(ok["output"]) == 1

    # When it pins another manifest under the same id, Then the worker refuses by name, with both prefixes
    refused = send(app, key, "hypha.infer", other, model="mlp", inputs=ROWS)
    with pytest.raises(ModelPinMismatch, match=rf"model 'mlp': the task pins manifest sha256 {other[:12]}\.\.\., "
                                               rf"this worker's store holds {held[:12]}\.\.\."):
        refused.get(timeout=60)
    assert refused.state == "FAILURE" and type(refused.result).__name__ == "ModelPinMismatch"

    # ... and a pinned hypha.train is refused before it trains: no new model appears in the store
    train = send(app, key, "hypha.train", other, model="mlp", data={"inputs": ROWS, "targets": [0]}, epochs=1,
                 new_model="mlp-pinned")
    with pytest.raises(ModelPinMismatch):
        train.get(timeout=60)
    assert not ModelStore(store_dir).has("mlp-pinned")
    assert ModelStore(store_dir).list() == ["mlp"]


def test_a_model_fetched_under_the_lease_is_checked_once_it_arrives(
    start_worker: Callable[..., Any], celery_client: Callable[..., Any], model_dir: Path, tmp_path: Path
) -> None:
    # Given a worker with an empty store and a local source that serves the example models
    store_dir = tmp_path / "empty"
    store_dir.mkdir()
    key = nacl.signing.SigningKey.generate()
    start_worker(verifying(key, {"model_dir": str(store_dir),
                                 "sources": [{"type": "local", "path": str(model_dir)}]}))
    app = celery_client()
    served = ModelStore(model_dir)
    # When a task pins another manifest than the source serves for that id
    refused = send(app, key, "hypha.infer", served.manifest_sha256("cnn"), model="mlp", inputs=ROWS)
    # Then the worker fetches it (it could not compare before) and refuses it once it is here
    with pytest.raises(ModelPinMismatch, match="model 'mlp'"):
        refused.get(timeout=60)
    assert ModelStore(store_dir).manifest_sha256("mlp") == served.manifest_sha256("mlp")
    # ... while a matching pin runs
    ok = send(app, key, "hypha.infer", served.manifest_sha256("mlp"), model="mlp", inputs=ROWS).get(timeout=60)
    assert ok["model"] == "mlp"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypha_celery.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_the_cli_prints_a_pin_and_refuses_one_it_cannot_sign(model_dir: Path, tmp_path: Path) -> None:
    # Given the example store, When an operator asks for mlp's pin, Then it is the manifest's sha256
    printed = cli("models", "sha256", "mlp", "--store", str(model_dir))
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == ModelStore(model_dir).manifest_sha256("mlp")
    missing = cli("models", "sha256", "nope", "--store", str(model_dir))
    assert missing.returncode != 0 and "'nope' is not in" in missing.stderr
    # When a run command is given a pin without a key, or a pin that is not a sha256, Then it refuses before sending
    key = tmp_path / "scheduler.key"
    generate_key(key)
    unsigned = cli("run", "embed", "--model", "mlp", "--model-sha256", printed.stdout.strip(), "text")
    assert unsigned.returncode == 2 and "pass --key too" in unsigned.stderr
    malformed = cli("run", "embed", "--model", "mlp", "--model-sha256", "ABC", "--key", str(key), "text")
    assert malformed.returncode == 2 and "64 lowercase hex characters" in malformed.stderr
