"""Training that survives a killed worker: real Redis, real workers, kill -9 mid-run, resumed from a checkpoint."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.models import checkpoint
from hypha_celery.models.examples import TINY_LLAMA
from hypha_celery.models.store import ModelStore
from hypha_celery.tools.launch import wait_for

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


@pytest.fixture
def store_dir(tmp_path: Path, model_dir: Path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns(".locks"))
    return target


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
