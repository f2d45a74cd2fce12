"""Training that survives a killed worker: real Redis, real workers, kill -9 mid-run, resumed from a checkpoint."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.harness.launch import wait_for
from hypha_celery.models.examples import TINY_LLAMA
from hypha_celery.models.shared_storage import LocalStorage
from hypha_celery.models.store import ModelStore
from hypha_celery.training.checkpoints import local as checkpoint
from hypha_celery.training.checkpoints import sync as checkpoint_sync
from tests.e2e.conftest import copy_store

TEXTS = ["the cat sat on the mat", "the dog ran across the park", "the train leaves at nine",
         "a bird sang in the tree"] * 3
# About 8 ms a step on an idle core: the run lasts seconds after its first checkpoint, time to kill it mid-way.
KWARGS: dict[str, Any] = {
    "model": TINY_LLAMA, "data": {"texts": TEXTS}, "method": "lora",
    "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "max_steps": 1000, "checkpoint_every": 25, "lr": 1e-2, "batch_size": 4, "warmup_steps": 10, "seed": 1,
    "requirements": {"cpu_cores": 1},
}
# The resumed run's final loss may differ from the uninterrupted run's by at most this fraction of it. Both run
# the same float32 arithmetic on one thread, so in practice they are equal; the margin allows another CPU's kernels.
MARGIN = 0.01


def _steps(folder: Path) -> list[int]:
    return sorted(int(entry.name.removeprefix("step-")) for entry in folder.glob("step-*")) if folder.is_dir() else []


@pytest.mark.timeout(600)
def test_a_worker_killed_mid_training_resumes_from_its_checkpoint_on_another(start_worker, celery_client,
                                                                              store_dir: Path) -> None:
    # Given worker A training a LoRA on the tiny Llama with a checkpoint every 25 steps, under the sandbox
    config = {"models": {"model_dir": str(store_dir)}, "task_timeout": 300}
    a = start_worker(config)
    app = celery_client()
    task_id = str(uuid.uuid4())
    folder = checkpoint.folder(store_dir, task_id)
    job = app.send_task("hypha.train", kwargs={**KWARGS, "new_model": "tiny-llama-resumed"}, task_id=task_id)
    wait_for(lambda: _steps(folder), 240, "a first checkpoint")
    # When A is killed -9 (with its executors) once a checkpoint exists, and B starts on the same model_dir
    a.kill9()
    [last] = _steps(folder)  # only the latest is kept
    assert 0 < last < KWARGS["max_steps"] and job.state != "SUCCESS"
    assert sorted(p.name for p in (folder / f"step-{last:09d}").iterdir()) == ["checkpoint.json", "state.safetensors"]
    b = start_worker(config)
    # Then the redelivered task finishes on B, resumed from A's last checkpoint
    result = job.get(timeout=300)
    output = result["output"]
    assert result["worker"].startswith(b.name) and output["model_id"] == "tiny-llama-resumed"
    assert output["resumed_from_step"] == last and output["checkpoint_refused"] is None
    assert output["steps"] == KWARGS["max_steps"] and len(output["loss_curve"]) == KWARGS["max_steps"]
    # ... its checkpoints are gone, and its adapter is stored
    assert not folder.exists()
    assert ModelStore(store_dir).manifest("tiny-llama-resumed").adapter_of is not None
    # And its final loss is within MARGIN of an uninterrupted run's (same arguments, another task id)
    reference = app.send_task("hypha.train", kwargs={**KWARGS, "new_model": "tiny-llama-reference"}).get(timeout=300)
    want = reference["output"]
    print(f"resumed at step {last}: final loss {output['final_loss']!r}, uninterrupted {want['final_loss']!r}")
    assert want["resumed_from_step"] == 0
    assert abs(output["final_loss"] - want["final_loss"]) <= MARGIN * want["final_loss"], (output["final_loss"],
                                                                                          want["final_loss"])
    assert output["final_loss"] < output["loss_curve"][0] * 0.5  # and it learned
    assert not any((store_dir / checkpoint.CHECKPOINTS).iterdir())


def _shared_step(shared: Path, task_id: str) -> int | None:
    """The step of the task's checkpoint in the shared folder, once its record is there."""
    raw = LocalStorage(shared).get_bytes(f"{checkpoint_sync.prefix(task_id)}/{checkpoint_sync.LATEST}")
    return None if raw is None else int(json.loads(raw)["step"])


@pytest.mark.timeout(600)
def test_a_killed_worker_resumes_on_a_worker_with_another_model_dir_through_shared_storage(
        start_worker, celery_client, model_dir: Path, tmp_path: Path) -> None:
    # Given workers A and B with their own model_dirs (copies: the same base model) and one shared storage folder
    shared = tmp_path / "shared"
    stores = [copy_store(model_dir, tmp_path / name) for name in ("store-a", "store-b")]
    configs = [{"models": {"model_dir": str(store)}, "task_timeout": 300,
                "training": {"shared_storage": {"type": "local", "path": str(shared)}}} for store in stores]
    a = start_worker(configs[0])
    app = celery_client()
    task_id = str(uuid.uuid4())
    job = app.send_task("hypha.train", kwargs={**KWARGS, "new_model": "tiny-llama-shared"}, task_id=task_id)
    # When A is killed -9 (its whole process group) once a checkpoint of the task reached the shared storage
    wait_for(lambda: _shared_step(shared, task_id), 240, "a checkpoint in shared storage")
    a.kill9()
    last = _shared_step(shared, task_id)
    assert last is not None and 0 < last < KWARGS["max_steps"] and job.state != "SUCCESS"
    assert not checkpoint.folder(stores[1], task_id).exists()  # B has never seen the task
    b = start_worker(configs[1])
    # Then the redelivered task finishes on B, resumed from the shared checkpoint
    output = job.get(timeout=300)
    assert output["worker"].startswith(b.name)
    result = output["output"]
    assert result["resumed_from_step"] == last and result["checkpoint_refused"] is None
    assert result["steps"] == KWARGS["max_steps"] and result["model_id"] == "tiny-llama-shared"
    # And the shared copy and B's local one are gone (A's model_dir keeps what it had when it died)
    assert not (shared / checkpoint_sync.prefix(task_id)).exists()
    assert not checkpoint.folder(stores[1], task_id).exists()
    assert ModelStore(stores[1]).manifest("tiny-llama-shared").adapter_of is not None


@pytest.mark.timeout(600)
def test_a_tampered_shared_checkpoint_is_refused_and_the_run_starts_fresh(
        start_worker, celery_client, model_dir: Path, tmp_path: Path) -> None:
    # Given a checkpoint of a task in shared storage whose state file was altered after upload
    shared, task_id = tmp_path / "shared", str(uuid.uuid4())
    source = checkpoint.folder(tmp_path / "elsewhere", task_id) / "step-000000025"
    source.mkdir(parents=True)
    (source / checkpoint.STATE).write_bytes(b"weights " * 1000)
    (source / checkpoint.META).write_text("{}")
    storage = LocalStorage(shared)
    assert checkpoint_sync.upload(storage, tmp_path / "elsewhere", task_id) == 25
    storage.put_bytes(f"{checkpoint_sync.prefix(task_id)}/step-000000025/{checkpoint.STATE}", b"WEIGHTS " * 1000)
    # When a worker with that shared storage runs the task
    store = copy_store(model_dir, tmp_path / "store")
    start_worker({"models": {"model_dir": str(store)}, "task_timeout": 300,
                  "training": {"shared_storage": {"type": "local", "path": str(shared)}}})
    app = celery_client()
    kwargs = {**KWARGS, "max_steps": 30, "new_model": "tiny-llama-fresh"}
    result = app.send_task("hypha.train", kwargs=kwargs, task_id=task_id).get(timeout=300)["output"]
    # Then the download refused it: the run started at step 0 and says why; nothing of it is left anywhere
    assert result["resumed_from_step"] == 0 and result["steps"] == 30
    assert "shared checkpoint was refused" in result["checkpoint_refused"]
    assert "tampered or corrupt" in result["checkpoint_refused"]
    assert not (shared / checkpoint_sync.prefix(task_id)).exists()
    assert not checkpoint.folder(store, task_id).exists()
