"""A copy of a training task whose model is already saved (issue 13, finding 2): answered, never refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import InvalidTask
from hypha_celery.formats.builtin import build
from hypha_celery.models.store import PRODUCED, ModelStore
from hypha_celery.monitoring.tracing import Tracing
from hypha_celery.stages.validation import TrainSpec, validate_train
from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.pipeline import Run, run_task
from hypha_celery.work import Trained

CONFIG = {"in_features": 4, "hidden": 8, "out_features": 3}
TASK_ID = "0b7d6c2e-1f0a-4c3e-9d2b-5a6f7e8d9c0b"
DEFAULT_ID = f"mlp-ft-{TASK_ID.replace('-', '')[:12]}"  # the id a train task without new_model saves
TRAINED = Trained(final_loss=0.25, loss_curve=[1.0, 0.5, 0.25], epochs=3, steps=6, samples=4)
KWARGS: dict[str, Any] = {"model": "mlp", "data": {"inputs": [[0.0, 1.0, 2.0, 3.0]], "targets": [1]}, "epochs": 3}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "models")
    store.add("builtin", build("mlp", CONFIG), "mlp", architecture="mlp", config=CONFIG, input_shape=[4])
    return store


def save_trained(store: ModelStore, model_id: str, produced_by: dict[str, Any] | None) -> None:
    store.add("builtin", build("mlp", CONFIG), model_id, architecture="mlp", config=CONFIG, input_shape=[4], parent="mlp",
               produced_by=produced_by)


def test_a_copy_of_the_task_that_saved_the_model_gets_what_training_reported(store: ModelStore) -> None:
    # Given the model this task id saved (its default id derives from the task id), with the run's record
    save_trained(store, DEFAULT_ID, {"task_id": TASK_ID, "trained": TRAINED.to_json()})
    # When the same task (same id, same kwargs) is validated again: a redelivered copy
    spec = validate_train(WorkerConfig(), store, (), KWARGS, TASK_ID)
    # Then it is accepted, names that model, and carries what the first run reported
    assert spec.new_model == DEFAULT_ID
    assert spec.finished == TRAINED


def test_an_explicit_new_model_saved_by_the_same_task_id_counts_too(store: ModelStore) -> None:
    save_trained(store, "mlp-mine", {"task_id": TASK_ID, "trained": TRAINED.to_json()})
    spec = validate_train(WorkerConfig(), store, (), {**KWARGS, "new_model": "mlp-mine"}, TASK_ID)
    assert spec.finished == TRAINED


@pytest.mark.parametrize(
    "record",
    [
        None,  # saved without a record (imported, or by an older worker)
        {"task_id": "another-task", "trained": TRAINED.to_json()},  # another task's model
        {"task_id": TASK_ID},  # a record without what training reported
        {"task_id": TASK_ID, "trained": {"final_loss": "low"}},  # ... or with a broken one
    ],
    ids=["no record", "other task", "no report", "broken report"],
)
def test_a_taken_id_without_this_tasks_record_is_still_refused(store: ModelStore, record: dict | None) -> None:
    # Given a model under the id this task would save, not (provably) saved by this task
    save_trained(store, DEFAULT_ID, record)
    # Then the task is refused as before: model ids are immutable
    with pytest.raises(InvalidTask, match="already exists"):
        validate_train(WorkerConfig(), store, (), KWARGS, TASK_ID)


def test_an_unreadable_record_reads_as_none(store: ModelStore) -> None:
    save_trained(store, DEFAULT_ID, {"task_id": TASK_ID, "trained": TRAINED.to_json()})
    (store.path(DEFAULT_ID) / PRODUCED).write_text("{not json")
    assert store.produced_by(DEFAULT_ID) is None
    with pytest.raises(InvalidTask, match="already exists"):
        validate_train(WorkerConfig(), store, (), KWARGS, TASK_ID)


def test_the_record_is_stored_with_the_model(store: ModelStore) -> None:
    save_trained(store, DEFAULT_ID, {"task_id": TASK_ID, "trained": TRAINED.to_json()})
    assert json.loads((store.path(DEFAULT_ID) / PRODUCED).read_text())["task_id"] == TASK_ID
    assert store.produced_by("mlp") is None  # a model saved without one has none


def test_the_pipeline_answers_a_finished_copy_without_reserving_anything() -> None:
    # Given a task whose validation found its output already saved
    app = Celery("train-copy-test", set_as_current=False)

    @app.task(name="hypha.test", base=HyphaTask, bind=True, shared=False)
    def probe(self: HyphaTask, **kwargs: Any) -> None:
        return None

    probe.push_request(id=TASK_ID, hostname="w@host", headers={}, delivery_info={"redelivered": True})
    security = SimpleNamespace(verify_task_signatures=False)
    # (no ledger, placement or lease keeper: admission would fail on them)
    probe.node = SimpleNamespace(config=SimpleNamespace(security=security), metrics=None,  # type: ignore[assignment]
                                 node_id="node-a", store=None, identity=None, tracing=Tracing())
    spec = TrainSpec(model="mlp", data={}, epochs=3, lr=0.1, batch_size=2, new_model=DEFAULT_ID,
                     requirements=None, manifest=None, finished=TRAINED)  # type: ignore[arg-type]
    probe.AsyncResult = lambda _id: SimpleNamespace(state="STARTED")  # type: ignore[method-assign]
    seen: list[Run] = []

    def body(run: Run, got: TrainSpec) -> dict[str, Any]:
        seen.append(run)
        return {"model_id": got.new_model}

    # When it runs
    try:
        result = run_task(probe, KWARGS, validate=lambda _ctx: spec, body=body)
    finally:
        probe.pop_request()
        app.close()
    # Then the body answered with an empty lease on this node, and nothing was admitted
    assert result == {"model_id": DEFAULT_ID}
    [run] = seen
    assert (run.lease.memory, run.lease.cores, run.lease.gpus, run.lease.node) == (0, {}, {}, "node-a")
