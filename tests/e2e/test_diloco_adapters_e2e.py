"""DiLoCo over LoRA adapters and sharded bases through real workers; the outer step under an executor's memory cap.

The fixtures and the corpus are :mod:`tests.e2e.test_diloco_e2e`'s (two workers, one core each, a shared folder).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np
import pytest

from hypha_celery.client import submit
from hypha_celery.errors import MemoryLimitExceeded
from hypha_celery.models.examples import TINY_LLAMA, write_tiny_llama
from hypha_celery.models.shared_storage import LocalStorage
from hypha_celery.models.store import ModelStore
from hypha_celery.training import diloco
from tests.e2e.test_diloco_e2e import CORES, TRAIN, key, shards, workers  # noqa: F401 - fixtures

INDEX = "model.safetensors.index.json"


def test_a_lora_diloco_job_sends_adapter_deltas_only_and_its_adapter_serves(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any],  # noqa: F811
        key: nacl.signing.SigningKey, model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from hypha_celery.formats.safetensors import read_header
    from hypha_celery.training.distributed.weights import Weights

    # Given two workers sharing a folder
    shared = tmp_path / "shared"
    workers({"type": "local", "path": str(shared)})
    app = celery_client()
    # When a LoRA DiLoCo job trains two rounds of the tiny causal LM's adapter
    done = diloco(TINY_LLAMA, shards(2, 8), rounds=2, inner_steps=3, outer_lr=1.0, outer_momentum=0.5, method="lora",
                  lora={"r": 4}, requirements=CORES, signing_key=key, app=app, round_timeout=300,
                  **{**TRAIN, "lr": 1e-2}).wait(timeout=600)
    # Then every version (v0 made by round 0, v1, v2) is a LoRA adapter of the base in the shared folder
    job = done["model_id"].rsplit("-v", 1)[0]
    assert done["model_id"] == f"{job}-v2" and done["adapter_of"] == TINY_LLAMA
    for version in ("v0", "v1", "v2"):
        manifest = json.loads((shared / "models" / f"{job}-{version}" / "manifest.json").read_text())
        assert manifest["adapter_of"]["id"] == TINY_LLAMA, manifest
    # And each round took both deltas, each the adapter's tensors only: a small fraction of a full fine-tune's
    full_bytes = 4 * read_header(ModelStore(model_dir).open(TINY_LLAMA).file("model.safetensors")).parameters
    adapter_bytes = read_header(shared / "models" / f"{job}-v0" / "adapter_model.safetensors").nbytes
    for entry in done["rounds"]:
        assert entry["refused"] == [] and entry["inner"], entry
        for inner in entry["inner"]:
            assert adapter_bytes <= inner["delta_bytes"] < 0.2 * full_bytes, (inner, adapter_bytes, full_bytes)
    print(f"LoRA delta {done['rounds'][0]['inner'][0]['delta_bytes']} B, full fine-tune delta {full_bytes} B")
    # And the outer steps moved the adapter: v2's tensors are not v0's
    v0 = Weights.read(shared / "models" / f"{job}-v0", ["adapter_model.safetensors"], "v0")
    v2 = Weights.read(shared / "models" / f"{job}-v2", ["adapter_model.safetensors"], "v2")
    with v0, v2:
        assert any(not np.array_equal(v0.tensor(n), v2.tensor(n)) for n in v0.names())
    # And the final adapter serves a generation, fetched from the shared folder by a worker like any model
    text = submit("hypha.generate", model=done["model_id"], prompt="the cat", max_new_tokens=4, signing_key=key,
                  app=app).get(timeout=180)["output"]["text"]
    assert isinstance(text, str)


def test_a_sharded_base_trains_two_rounds_and_each_version_stays_sharded_and_in_its_dtype(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any],  # noqa: F811
        key: nacl.signing.SigningKey, model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from tests.unit.test_diloco_sharded import SHARDS, sharded_folder

    # Given the tiny causal LM in two bfloat16 shards with its index, in a source of its own
    weight_map = sharded_folder(tmp_path / "sharded-copy")
    config = json.loads((tmp_path / "sharded-copy" / "config.json").read_text())
    (tmp_path / "sharded-copy" / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    source = tmp_path / "sharded-source"
    ModelStore(source).add("transformers", tmp_path / "sharded-copy", "tiny-llama-sharded")
    shared = tmp_path / "shared"
    workers({"type": "local", "path": str(shared)}, sources=(source,))
    # When DiLoCo trains it for two rounds on two workers
    done = diloco("tiny-llama-sharded", shards(2, 8), rounds=2, inner_steps=3, outer_lr=1.0, outer_momentum=0.5,
                  requirements=CORES, signing_key=key, app=celery_client(), round_timeout=300, **TRAIN).wait(timeout=600)
    # Then both rounds took both deltas, and each version is the base's index and shards, each shard bfloat16
    from safetensors import safe_open

    assert [(r["round"], r["refused"]) for r in done["rounds"]] == [(1, []), (2, [])]
    job = done["model_id"].rsplit("-v", 1)[0]
    for version in ("v1", "v2"):
        folder = shared / "models" / f"{job}-{version}"
        assert not (folder / "model.safetensors").exists()
        assert json.loads((folder / INDEX).read_text())["weight_map"] == weight_map
        for shard in SHARDS:
            with safe_open(str(folder / shard), framework="pt") as handle:
                assert set(handle.keys()) == {n for n, s in weight_map.items() if s == shard}
                assert {str(handle.get_tensor(n).dtype) for n in handle.keys()} == {"torch.bfloat16"}, version
    # And the momentum is kept one file per shard
    assert sorted(p.name for p in (shared / "jobs" / job / "momentum-2").iterdir()) == sorted(SHARDS)
    assert done["rounds"][1]["loss"] < done["rounds"][0]["loss"]


def test_the_outer_step_runs_under_the_leases_memory_cap_and_a_step_over_it_fails_by_name(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any],  # noqa: F811
        key: nacl.signing.SigningKey, tmp_path: Path) -> None:  # noqa: F811
    from hypha_celery.training.distributed.deltas import save_tensors
    from hypha_celery.training.distributed.weights import Weights

    # Given a causal LM with 16 MiB tensors (a wide MLP) in a source, and four honest-looking deltas for round 1 in
    # the shared folder: the step needs several hundred MiB (each delta's tensor in float64, stacked)
    (tmp_path / "wide").mkdir()
    write_tiny_llama(tmp_path / "wide", layers=1, intermediate=65536)
    source = tmp_path / "wide-source"
    ModelStore(source).add("transformers", tmp_path / "wide", "wide-llama")
    base = ModelStore(source).open("wide-llama")
    shared = tmp_path / "shared"
    storage = LocalStorage(shared)
    (worker,) = workers({"type": "local", "path": str(shared)}, count=1, sources=(source,))
    app, job = celery_client(), "cap-test"
    reports = []
    with Weights.of(base) as weights:
        shapes = dict(weights.shapes)
    for index in range(4):
        path = tmp_path / f"d{index}.safetensors"
        save_tensors({name: np.full(shape, 1e-3, np.float32) for name, shape in shapes.items()}, path,
                     {"job": job, "round": "1", "base_sha256": base.sha256, "encoding": "none"})
        ref = f"jobs/{job}/round-1/t{index}.safetensors"
        reports.append({"job": job, "round": 1, "ref": ref, "sha256": storage.put_file(ref, path).sha256,
                        "samples": 4, "worker": f"w{index}"})

    def outer(memory: str) -> Any:
        return submit("hypha.aggregate", job=job, round=1, base="wide-llama", deltas=reports, min_workers=4,
                      outer_lr=1.0, outer_momentum=0.0, max_base_norm_ratio=None,
                      requirements={"cpu_cores": 0.5, "memory": memory}, signing_key=key, app=app)

    # When the outer step is sent with a 16 MiB memory reservation, then it fails in its executor by name
    with pytest.raises(MemoryLimitExceeded):
        outer("16MiB").get(timeout=300)
    # And the worker lives on: the same step with 1.5 GiB runs, on the same worker, and publishes the version
    out = outer("1536MiB").get(timeout=300)["output"]
    assert out["deltas"] == 4 and out["model_id"] == f"{job}-v1" and worker.alive()
    assert storage.exists(f"models/{job}-v1/manifest.json")
    print(f"outer step peak {out['memory_peak'] >> 20} MiB in its executor")
