"""Training checkpoints in process: a resumed run equals an uninterrupted one; another run's checkpoint is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.models.examples import TINY_CLASSIFIER, TINY_LLAMA, init_examples
from hypha_celery.models.store import ModelStore
from hypha_celery.training.checkpoints import local as checkpoint
from hypha_celery.training.checkpoints.local import Identity, Position, TaskCheckpoints
from hypha_celery.work import Progress, Train

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a bird sang in the tree", "the sun rose over the hill",
         "the train leaves at nine"]
LABELS = ["positive", "negative", "positive", "negative", "positive"]
TASK = "0b7d6c2e-1f0a-4c3e-9d2b-5a6f7e8d9c0b"
# batch 1 x grad_accum 2 over 5 texts: 3 steps an epoch (the last of one micro-batch), so step 4 is mid-epoch 2
RUNS: dict[str, dict[str, Any]] = {
    "lora": {"model": TINY_LLAMA, "data": {"texts": TEXTS}, "method": "lora",
             "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "lr": 1e-2},
    "full": {"model": TINY_CLASSIFIER, "data": {"texts": TEXTS, "labels": LABELS}, "method": "full", "lr": 1e-3},
}


class Killed(Exception):
    """Stands for a kill -9 in the middle of training."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ckpt-store")
    init_examples(root)
    return ModelStore(root)


def _request(kind: str, **overrides: Any) -> tuple[Train, dict[str, Any]]:
    run = {**RUNS[kind], **overrides}
    data = run.pop("data")
    return Train(new_model="unused", epochs=1, batch_size=1, grad_accum=2, max_steps=12, warmup_steps=2, seed=7,
                 progress_interval=0.0, task_id=TASK, **run), data


def _train(store: ModelStore, request: Train, data: dict[str, Any], *, kill_at: int | None = None) -> Any:
    from hypha_celery.training.finetune.run import finetune

    def progress(update: Progress) -> None:
        if kill_at is not None and update.step == kill_at:
            raise Killed(update.step)

    return finetune(store, request, data, "cpu", progress)


def _trainable(done: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in done.module.named_parameters() if p.requires_grad}


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(store: ModelStore, kind: str) -> None:
    import torch

    # Given an uninterrupted run, without checkpoints
    plain, data = _request(kind)
    reference = _train(store, plain, data)
    assert reference.trained.resumed_from_step == 0
    # When the same run with checkpoint_every=4 is killed at step 6 (its last checkpoint: step 4, mid-epoch 2)
    request, _ = _request(kind, checkpoint_every=4)
    with pytest.raises(Killed):
        _train(store, request, data, kill_at=6)
    where = checkpoint.folder(store.root, TASK)
    # Then only the latest checkpoint is kept, as one safetensors file and one JSON file
    assert _files(where) == ["step-000000004/checkpoint.json", "step-000000004/state.safetensors"]
    meta = json.loads((where / "step-000000004" / "checkpoint.json").read_text())
    assert (meta["step"], meta["epoch"], meta["position"], len(meta["curve"])) == (4, 2, 2, 4)
    assert meta["identity"]["model_sha256"] == store.manifest_sha256(request.model)
    # When the run starts again (a redelivered copy): it resumes at step 4
    resumed = _train(store, request, data)
    # Then it reports where it resumed, and ends with the uninterrupted run's weights, loss curve and tokens
    assert resumed.trained.resumed_from_step == 4 and resumed.trained.checkpoint_refused is None
    assert resumed.trained.loss_curve == reference.trained.loss_curve
    assert resumed.trained.final_loss == reference.trained.final_loss
    assert resumed.trained.trained_tokens == reference.trained.trained_tokens
    want, got = _trainable(reference), _trainable(resumed)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)
    checkpoint.discard(store.root, TASK)


def test_the_checkpoint_holds_trainable_weights_optimizer_state_and_rng_only(store: ModelStore) -> None:
    from safetensors import safe_open

    # Given a LoRA run killed after its first checkpoint
    request, data = _request("lora", checkpoint_every=3)
    with pytest.raises(Killed):
        _train(store, request, data, kill_at=4)
    state = checkpoint.folder(store.root, TASK) / "step-000000003" / "state.safetensors"
    with safe_open(str(state), framework="pt") as handle:
        keys = set(handle.keys())
        rng = handle.get_tensor("rng.torch")
    # Then its weights are the adapter's trainable tensors only, each with AdamW's two moments and step
    weights = {key for key in keys if key.startswith("param.")}
    assert weights and all("lora_" in key for key in weights)
    assert {key.rsplit(".", 1)[-1] for key in keys if key.startswith("optim.")} == {"step", "exp_avg", "exp_avg_sq"}
    assert len([key for key in keys if key.endswith(".exp_avg")]) == len(weights)
    # ... and torch's RNG state as uint8; nothing else
    assert str(rng.dtype) == "torch.uint8" and keys == weights | {k for k in keys if k.startswith("optim.")} | {"rng.torch"}
    checkpoint.discard(store.root, TASK)
    assert not checkpoint.folder(store.root, TASK).exists()


def test_a_checkpoint_of_other_data_is_refused_deleted_and_the_run_starts_at_step_0(store: ModelStore) -> None:
    # Given a checkpoint left by a run on some texts
    request, data = _request("lora", checkpoint_every=4)
    with pytest.raises(Killed):
        _train(store, request, data, kill_at=6)
    # When a run with the same task id trains on other texts
    other = {"texts": [*TEXTS[:-1], "a different last text"]}
    done = _train(store, request, other)
    # Then the checkpoint was refused with the reason, the run trained all its steps from 0, and it equals a fresh run
    assert done.trained.resumed_from_step == 0
    assert done.trained.checkpoint_refused == "the training data differ from the checkpointed run's"
    fresh = _train(store, _request("lora")[0], other)
    assert done.trained.loss_curve == fresh.trained.loss_curve and len(done.trained.loss_curve) == 12
    checkpoint.discard(store.root, TASK)


def test_an_unreadable_checkpoint_is_refused(store: ModelStore) -> None:
    # Given a checkpoint whose safetensors file was cut short
    request, data = _request("lora", checkpoint_every=4)
    with pytest.raises(Killed):
        _train(store, request, data, kill_at=6)
    state = checkpoint.folder(store.root, TASK) / "step-000000004" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    # When the run starts again, Then it says so and starts at step 0
    done = _train(store, request, data)
    assert done.trained.resumed_from_step == 0
    assert done.trained.checkpoint_refused is not None and "unreadable" in done.trained.checkpoint_refused
    checkpoint.discard(store.root, TASK)


# --- TaskCheckpoints on a small torch module: the identity checks --------------------------------------


def _module_run(root: Path, identity: Identity, *, rows: int = 3) -> tuple[TaskCheckpoints, Any, Any, Any]:
    import torch

    torch.manual_seed(0)
    module = torch.nn.Linear(4, rows)
    named = list(module.named_parameters())
    optimizer = torch.optim.AdamW([p for _, p in named], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return TaskCheckpoints(root, TASK, 1, identity), named, optimizer, schedule


def _step(named: Any, optimizer: Any, schedule: Any) -> None:
    sum(p.sum() for _, p in named).backward()
    optimizer.step()
    schedule.step()


IDENTITY = Identity(model_sha256="a" * 64, data_sha256="d" * 64, settings={"lr": 0.1, "lora": {"r": 4}})


@pytest.mark.parametrize(("identity", "rows", "reason"), [
    (Identity("b" * 64, "d" * 64, IDENTITY.settings), 3, "the model changed: checkpoint of manifest sha256 aaaa"),
    (Identity("a" * 64, "e" * 64, IDENTITY.settings), 3, "the training data differ"),
    (Identity("a" * 64, "d" * 64, {"lr": 0.2, "lora": {"r": 4}}), 3, "the training settings differ: lr 0.1 -> 0.2"),
    (IDENTITY, 5, "the trainable parameters' names or shapes differ"),
])
def test_a_checkpoint_of_another_model_data_settings_or_shape_is_refused(tmp_path: Path, identity: Identity, rows: int,
                                                                         reason: str) -> None:
    # Given a checkpoint written by one run
    saver, named, optimizer, schedule = _module_run(tmp_path, IDENTITY)
    _step(named, optimizer, schedule)
    saver.save(Position(step=1, epoch=1, position=1, order_state=[3, [1, 2], None], curve=[0.5], tokens=10),
               named, optimizer, schedule)
    # When a run that differs in one thing looks for it
    loader, named, optimizer, schedule = _module_run(tmp_path, identity, rows=rows)
    before = [p.detach().clone() for _, p in named]
    # Then it is refused with the reason, deleted, and nothing was restored
    assert loader.restore(named, optimizer, schedule) is None
    assert loader.refused is not None and loader.refused.startswith(reason), loader.refused
    assert loader.resumed_from_step == 0 and not checkpoint.folder(tmp_path, TASK).exists()
    assert all((p == b).all() for (_, p), b in zip(named, before, strict=True)) and not optimizer.state


def test_a_matching_checkpoint_restores_weights_optimizer_schedule_and_rng(tmp_path: Path) -> None:
    import torch

    # Given a run checkpointed after two steps, its next random numbers and learning rate noted
    saver, named, optimizer, schedule = _module_run(tmp_path, IDENTITY)
    for step in (1, 2):
        _step(named, optimizer, schedule)
        saver.save(Position(step=step, epoch=1, position=step, order_state=[3, [1, 2], None], curve=[0.5] * step,
                            tokens=10 * step), named, optimizer, schedule)
    weights = [p.detach().clone() for _, p in named]
    lr = optimizer.param_groups[0]["lr"]
    after = torch.rand(3)
    # Then only the latest checkpoint is kept
    assert _files(checkpoint.folder(tmp_path, TASK)) == ["step-000000002/checkpoint.json",
                                                         "step-000000002/state.safetensors"]
    # When a new run of the same identity restores it
    loader, named, optimizer, schedule = _module_run(tmp_path, IDENTITY)
    at = loader.restore(named, optimizer, schedule)
    # Then it resumes at step 2 with the weights, AdamW state, learning rate and torch RNG of then
    assert at is not None and (at.step, at.position, at.tokens, at.curve) == (2, 2, 20, [0.5, 0.5])
    assert loader.resumed_from_step == 2
    assert all(torch.equal(p, w) for (_, p), w in zip(named, weights, strict=True))
    assert optimizer.param_groups[0]["lr"] == lr and schedule.last_epoch == 2
    assert float(optimizer.state_dict()["state"][0]["step"]) == 2.0
    assert torch.equal(torch.rand(3), after)


def test_a_task_id_that_is_no_path_component_is_hashed(tmp_path: Path) -> None:
    assert checkpoint.folder(tmp_path, "../../etc").parent == tmp_path / ".checkpoints"
    assert checkpoint.folder(tmp_path, "../../etc").name.startswith("sha256-")
    assert checkpoint.folder(tmp_path, TASK).name == TASK


def test_no_checkpoint_without_checkpoint_every(store: ModelStore) -> None:
    request, data = _request("lora")
    _train(store, request, data)
    assert not checkpoint.folder(store.root, TASK).exists()


def test_discard_needs_no_checkpoint_to_exist(tmp_path: Path) -> None:
    assert checkpoint.discard(tmp_path, TASK) is False
    (checkpoint.folder(tmp_path, TASK) / "step-000000001").mkdir(parents=True)
    assert checkpoint.discard(tmp_path, TASK) is True and not checkpoint.folder(tmp_path, TASK).exists()
    shutil.rmtree(tmp_path / ".checkpoints")


# --- the worker's side: a copy answered from the saved model, and a failed run, delete the checkpoints -----


def _left_checkpoint(root: Path) -> Path:
    path = checkpoint.folder(root, TASK) / "step-000000004"
    path.mkdir(parents=True)
    (path / "checkpoint.json").write_text("{}")
    return path.parent


def _run_of(root: Path, executors: Any = None, shared: Any = None) -> Any:
    from types import SimpleNamespace

    from hypha_celery.resources.ledger import Lease
    from hypha_celery.stages.results import Timing
    from hypha_celery.tasks.pipeline import Run

    ctx = SimpleNamespace(store=ModelStore(root), executors=executors, config=SimpleNamespace(task_timeout=60),
                          shared_storage=shared)
    task = SimpleNamespace(request=SimpleNamespace(id=TASK), send_event=lambda *a, **k: None,
                           update_state=lambda **k: None)
    lease = Lease(id="", node="node-a", memory=0, cores={}, gpus={}, exclusive_gpu=False, task_id=TASK)
    return Run(ctx, task, lease, Timing(started_at=1.0), "w@host")  # type: ignore[arg-type]


def test_a_copy_answered_from_its_saved_model_deletes_the_checkpoints_left(tmp_path: Path) -> None:
    from hypha_celery.stages.validation import TrainSpec
    from hypha_celery.training.job import run_training
    from hypha_celery.work import Trained

    # Given a checkpoint left by a run killed between saving its model and deleting it
    left = _left_checkpoint(tmp_path)
    trained = Trained(final_loss=0.5, loss_curve=[1.0, 0.5], epochs=1, steps=2, samples=4, resumed_from_step=1)
    spec = TrainSpec(model=TINY_LLAMA, data={}, epochs=1, lr=0.1, batch_size=2, new_model="done",
                     requirements=None, manifest=None, finished=trained)  # type: ignore[arg-type]
    # When the copy is answered from the saved model
    result = run_training(_run_of(tmp_path), spec)
    # Then it reports what that run did, and the checkpoints are gone
    assert result["output"]["resumed_from_step"] == 1 and result["metrics"]["saved_earlier"] is True
    assert not left.exists()


def test_a_failed_run_deletes_its_checkpoints(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from hypha_celery.errors import ExecutionError
    from hypha_celery.stages.validation import FinetuneParams, TrainSpec
    from hypha_celery.training.job import run_training

    # Given a run whose executor job fails, with a checkpoint of the task on disk
    left = _left_checkpoint(tmp_path)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise ExecutionError("RuntimeError: boom")

    spec = TrainSpec(model=TINY_LLAMA, data={"texts": TEXTS}, epochs=1, lr=0.1, batch_size=2, new_model="never",
                     requirements=None, manifest=object(), finetune=FinetuneParams(checkpoint_every=4))  # type: ignore[arg-type]
    # When it runs, Then the failure is the task's answer, and its checkpoints are gone
    with pytest.raises(ExecutionError, match="boom"):
        run_training(_run_of(tmp_path, SimpleNamespace(run_job=fail)), spec)
    assert not left.exists()


def test_a_run_with_shared_storage_fetches_first_and_a_failure_deletes_both_copies(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from hypha_celery.errors import ExecutionError
    from hypha_celery.models.shared_storage import LocalStorage
    from hypha_celery.stages.validation import FinetuneParams, TrainSpec
    from hypha_celery.training.checkpoints import sync as checkpoint_sync
    from hypha_celery.training.job import run_training

    # Given a checkpoint of the task that another worker (another model_dir) uploaded to shared storage
    shared = LocalStorage(tmp_path / "shared")
    (_left_checkpoint(tmp_path / "other") / "step-000000004" / checkpoint.STATE).write_bytes(b"state")
    assert checkpoint_sync.upload(shared, tmp_path / "other", TASK) == 4
    seen: list[Any] = []

    def fail(job: Train, **kwargs: Any) -> None:  # the executor: sees what is local when it starts, then fails
        seen.append(checkpoint.latest(tmp_path / "store", TASK))
        raise ExecutionError("RuntimeError: boom")

    spec = TrainSpec(model=TINY_LLAMA, data={"texts": TEXTS}, epochs=1, lr=0.1, batch_size=2, new_model="never",
                     requirements=None, manifest=object(), finetune=FinetuneParams(checkpoint_every=4))  # type: ignore[arg-type]
    # When the task runs here and its executor job fails
    with pytest.raises(ExecutionError, match="boom"):
        run_training(_run_of(tmp_path / "store", SimpleNamespace(run_job=fail), shared), spec)
    # Then the executor found the shared checkpoint in the local store, and both copies are gone
    assert seen[0] is not None and seen[0][0] == 4
    assert not checkpoint.folder(tmp_path / "store", TASK).exists()
    assert not (tmp_path / "shared" / checkpoint_sync.prefix(TASK)).exists()


def test_a_copy_answered_from_its_saved_model_deletes_the_shared_checkpoint(tmp_path: Path) -> None:
    from hypha_celery.models.shared_storage import LocalStorage
    from hypha_celery.stages.validation import TrainSpec
    from hypha_celery.training.checkpoints import sync as checkpoint_sync
    from hypha_celery.training.job import run_training
    from hypha_celery.work import Trained

    # Given a shared checkpoint left by a run killed between saving its model and deleting it
    shared = LocalStorage(tmp_path / "shared")
    (_left_checkpoint(tmp_path / "other") / "step-000000004" / checkpoint.STATE).write_bytes(b"state")
    checkpoint_sync.upload(shared, tmp_path / "other", TASK)
    trained = Trained(final_loss=0.5, loss_curve=[1.0, 0.5], epochs=1, steps=2, samples=4)
    spec = TrainSpec(model=TINY_LLAMA, data={}, epochs=1, lr=0.1, batch_size=2, new_model="done",
                     requirements=None, manifest=None, finished=trained)  # type: ignore[arg-type]
    # When the copy is answered from the saved model, Then the shared checkpoint is gone
    run_training(_run_of(tmp_path / "store", shared=shared), spec)
    assert not (tmp_path / "shared" / checkpoint_sync.prefix(TASK)).exists()
