"""DiLoCo on a sharded base: the outer step reads it tensor by tensor and writes each version in its layout and dtype;
a hostile index, shard or delta is refused by name (:mod:`hypha_celery.training.distributed.weights`, ``apply``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hypha_celery.errors import DeltaRejected, UnsupportedModel
from hypha_celery.models.examples import write_tiny_llama
from hypha_celery.models.store import ModelStore
from hypha_celery.training.distributed.apply import run
from hypha_celery.training.distributed.deltas import pseudo_gradient, save_tensors
from hypha_celery.training.distributed.weights import Weights
from hypha_celery.work import OuterStep

INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def sharded_folder(folder: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """The tiny causal LM in ``folder``, its weights cut into two shards of ``dtype`` with their index."""
    folder.mkdir()
    write_tiny_llama(folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {name: SHARDS[0] if index < len(names) // 2 else SHARDS[1] for index, name in enumerate(names)}
    for shard in SHARDS:
        save_file({n: state[n].to(dtype) for n, s in weight_map.items() if s == shard}, str(folder / shard),
                  metadata={"format": "pt"})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    sharded_folder(tmp_path / "src")
    store.add("transformers", tmp_path / "src", "sharded")
    return store


def _delta(store: ModelStore, tmp_path: Path, name: str, scale: float, sha: str, round_: int = 1,
           model: str = "sharded") -> Path:
    with Weights.of(store.open(model)) as base:
        tensors = {n: np.full(base.shapes[n], scale, np.float32) for n in base.names()}
    path = tmp_path / f"{name}.safetensors"
    save_tensors(tensors, path, {"job": "j", "round": str(round_), "base_sha256": sha, "encoding": "none"})
    return path


def _step(store: ModelStore, tmp_path: Path, paths: list[Path], round_: int, base: str, next_id: str,
          momentum_in: dict[str, str] | None = None) -> dict:
    scratch = tmp_path / f"scratch-{round_}"
    scratch.mkdir()
    work = tmp_path / f"work-{round_}"
    work.mkdir()
    return run(store, OuterStep(job="j", round=round_, base=base, next_id=next_id, scratch=str(scratch),
                                deltas=[{"path": str(p), "weight": 1, "what": p.name} for p in paths],
                                expected={"job": "j", "round": str(round_),
                                          "base_sha256": store.open(base).sha256},
                                momentum_in=momentum_in, lr=1.0, momentum=0.5), work)


def test_two_outer_steps_on_a_sharded_base_keep_its_shards_and_dtype(store: ModelStore, tmp_path: Path) -> None:
    # Given a bfloat16 base in two shards and two workers' deltas of 0.25 and 0.75 for round 1
    base = store.open("sharded")
    deltas = [_delta(store, tmp_path, f"d{i}", scale, base.sha256) for i, scale in enumerate((0.25, 0.75))]
    # When the outer step runs for two rounds (round 2 on round 1's version, with its momentum)
    first = _step(store, tmp_path, deltas, 1, "sharded", "j-v1")
    v1 = store.open("j-v1")
    again = [_delta(store, tmp_path, f"e{i}", 0.5, v1.sha256, round_=2, model="j-v1") for i in range(2)]
    second = _step(store, tmp_path, again, 2, "j-v1", "j-v2", momentum_in=first["momentum"])
    # Then both versions list the base's index and shards, each shard holds the tensors the index maps to it, in
    # bfloat16
    weight_map = json.loads(base.file(INDEX).read_text())["weight_map"]
    for version in ("j-v1", "j-v2"):
        entry = store.open(version)
        assert set(SHARDS) | {INDEX} <= set(entry.manifest.files) and "model.safetensors" not in entry.manifest.files
        assert json.loads(entry.file(INDEX).read_text())["weight_map"] == weight_map
        for shard in SHARDS:
            with safe_open(str(entry.file(shard)), framework="pt") as handle:
                assert set(handle.keys()) == {n for n, s in weight_map.items() if s == shard}
                assert {handle.get_tensor(n).dtype for n in handle.keys()} == {torch.bfloat16}
    # And the momentum is one float32 file per shard; the step is the Nesterov one (lr 1, momentum 0.5):
    # v1 = base - (g + 0.5 g) with g = 0.5; v2 = v1 - (0.5 + 0.5 * (0.5 * 0.5 + 0.5))
    assert set(first["momentum"]) == set(SHARDS) and second["accepted"] == [0, 1]
    name = next(iter(weight_map))
    with Weights.of(base) as b, Weights.of(store.open("j-v2")) as v2:
        start, end = b.tensor(name).astype(np.float64), v2.tensor(name).astype(np.float64)
    np.testing.assert_allclose(end, start - 0.75 - 0.875, atol=0.05)


def test_an_index_naming_a_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    # Given a sharded folder whose index maps a tensor to ../elsewhere.safetensors
    weight_map = sharded_folder(tmp_path / "m")
    shutil.copyfile(tmp_path / "m" / SHARDS[0], tmp_path / "elsewhere.safetensors")
    name = next(iter(weight_map))
    (tmp_path / "m" / INDEX).write_text(json.dumps({"weight_map": {**weight_map, name: "../elsewhere.safetensors"}}))
    # When a store imports it, or DiLoCo reads its index, it is refused
    with pytest.raises(UnsupportedModel):
        ModelStore(tmp_path / "store").add("transformers", tmp_path / "m", "evil")
    from hypha_celery.training.distributed.weights import _weight_map

    with pytest.raises(UnsupportedModel, match="not a shard file of this model"):
        _weight_map(tmp_path / "m" / INDEX, [*SHARDS, INDEX], "evil")


def test_a_weight_map_naming_a_tensor_its_shard_lacks_is_refused(tmp_path: Path) -> None:
    # Given an index that maps one more tensor to the first shard than it holds
    weight_map = sharded_folder(tmp_path / "m")
    planted = {**weight_map, "model.ghost.weight": SHARDS[0]}
    # When DiLoCo reads the shards against it, then the fault is named
    with pytest.raises(UnsupportedModel, match=r"does not hold exactly the tensors .*model\.ghost\.weight"):
        Weights.read(tmp_path / "m", list(SHARDS), "evil", planted)
    # And a shard holding a tensor the index does not map there is refused the same way
    moved = {**weight_map, next(iter(weight_map)): SHARDS[1]}
    with pytest.raises(UnsupportedModel, match="does not hold exactly"):
        Weights.read(tmp_path / "m", list(SHARDS), "evil", moved)


def test_deltas_and_momentum_that_disagree_with_the_base_are_refused(store: ModelStore, tmp_path: Path) -> None:
    base = store.open("sharded")
    good = _delta(store, tmp_path, "good", 0.1, base.sha256)
    # Given a delta with one tensor of the wrong shape, and one of integers
    with Weights.of(base) as weights:
        name = next(weights.names())
        tensors = {n: np.zeros(weights.shapes[n], np.float32) for n in weights.names()}
    meta = {"job": "j", "round": "1", "base_sha256": base.sha256, "encoding": "none"}
    save_tensors({**tensors, name: np.zeros((3,), np.float32)}, tmp_path / "shape.safetensors", meta)
    save_tensors({**tensors, name: np.zeros(tensors[name].shape, np.int32)}, tmp_path / "ints.safetensors", meta)
    # When the outer step takes them with an honest one, then the two are refused by name and the honest one applied
    out = _step(store, tmp_path, [good, tmp_path / "shape.safetensors", tmp_path / "ints.safetensors"], 1, "sharded",
                "j-v1")
    reasons = {entry["index"]: entry["reason"] for entry in out["refused"]}
    assert out["accepted"] == [0] and "shape" in reasons[1] and "int32" in reasons[2]
    # And a momentum whose files are not the base's shards refuses the step
    later = _delta(store, tmp_path, "later", 0.1, base.sha256, round_=2)
    with pytest.raises(DeltaRejected, match="momentum files are not the base's weight files"):
        _step(store, tmp_path, [later], 2, "sharded", "j-v2",
              momentum_in={"model.safetensors": out["momentum"][SHARDS[0]]})


def test_a_pseudo_gradient_reads_a_sharded_base_against_a_one_file_trained_model(store: ModelStore,
                                                                                 tmp_path: Path) -> None:
    # Given the sharded base and a trained model saved as one file (as save_pretrained writes a small one)
    base = store.open("sharded")
    with Weights.of(base) as weights:
        trained = {n: torch.from_numpy(weights.tensor(n).astype(np.float32) - 0.5) for n in weights.names()}
    save_file(trained, str(tmp_path / "trained.safetensors"))
    # When the delta is taken, then every tensor is base - trained
    delta = pseudo_gradient(Weights.of(base), tmp_path / "trained.safetensors")
    assert set(delta) == set(trained)
    assert all(np.allclose(tensor, 0.5, atol=1e-2) for tensor in delta.values())


def test_a_tensor_safetensors_could_not_allocate_is_a_memory_error() -> None:
    from hypha_celery.training.distributed.weights import read_tensor

    class PanicException(BaseException):  # pyo3's, as safetensors raises it when its array's allocation failed
        pass

    class Handle:
        def __init__(self, message: str) -> None:
            self.message = message

        def get_tensor(self, name: str) -> None:
            raise PanicException(self.message)

    # Given a safetensors handle whose array allocation fails under the cap, When a tensor is read, Then MemoryError
    with pytest.raises(MemoryError, match="tensor w"):
        read_tensor(Handle("PyObject pointer is null"), "w")
    # And any other panic stays what it is
    with pytest.raises(PanicException):
        read_tensor(Handle("index out of bounds"), "w")
