"""Models through a real worker: cache eviction and single-flight, training with progress, limits."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch

from hypha_celery.errors import MemoryLimitExceeded, TaskTimeout
from hypha_celery.formats.builtin import build
from hypha_celery.models.examples import clusters
from hypha_celery.models.store import ModelStore
from hypha_celery.resources.ledger import Ledger
from tests.conftest import free_port, scrape, wait_for
from tests.e2e.test_worker_e2e import direct

IMAGE = [[[((x * 7 + y) % 13) / 13 for y in range(28)] for x in range(28)]]


def test_cache_evicts_by_bytes_and_hits_when_warm(start_worker, celery_client, store_dir: Path, redis_url: str) -> None:
    # Given two models that fit the cache alone but not together
    config = {"in_features": 4, "hidden": 256, "out_features": 3}
    ModelStore(store_dir).add("builtin", build("mlp", config), "mlp-big", architecture="mlp", config=config, input_shape=[4])
    port = free_port()
    start_worker({"model_cache_size": "10000", "models": {"model_dir": str(store_dir), "max_model_size": "10000"},
                  "monitoring": {"collect_metrics": True, "metrics_port": port}})
    app = celery_client()

    def run(model: str, inputs: object) -> dict:
        return app.send_task("hypha.infer", kwargs={"model": model, "inputs": inputs}).get(timeout=60)["metrics"]

    # When they alternate, each evicts the other: every call loads
    alternating = [run("cnn", IMAGE), run("mlp-big", [[1.0, 2.0, 3.0, 4.0]]), run("cnn", IMAGE),
                   run("mlp-big", [[1.0, 2.0, 3.0, 4.0]])]
    assert [m["cache_hit"] for m in alternating] == [False] * 4 and all(m["load_s"] > 0 for m in alternating)
    # And a repeated model hits with no load time
    repeat = run("mlp-big", [[4.0, 3.0, 2.0, 1.0]])
    assert repeat["cache_hit"] and repeat["load_s"] == 0
    samples = wait_for(lambda: (s := scrape(port)).get("hypha_worker_model_cache_hits_total") == 1 and s, 10, "metrics")
    assert samples["hypha_worker_model_cache_misses_total"] == 4
    assert samples["hypha_worker_model_cache_evictions_total"] >= 3
    # ... and `hypha-celery top` shows the hit rate from the registry (refreshed every 2 s here)
    def top() -> str:
        return subprocess.run([sys.executable, "-m", "hypha_celery.cli", "top", "--once", "--registry", redis_url],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    frame = wait_for(lambda: "cache hit rate 20%" in (out := top()) and out, 10, "top to show the hit rate")
    assert "1 hits, 4 misses" in frame and "cpu    [" in frame


def test_eight_cold_requests_load_once(start_worker, celery_client) -> None:
    start_worker({"max_concurrent_tasks": 8})
    app = celery_client()
    sent = [app.send_task("hypha.infer", kwargs={"model": "cnn", "inputs": IMAGE, "requirements": {"cpu_cores": 0.1}})
            for _ in range(8)]
    metrics = [r.get(timeout=60)["metrics"] for r in sent]
    assert sum(1 for m in metrics if not m["cache_hit"]) == 1


def test_compact_tensor_encoding_round_trips(start_worker, celery_client, model_dir: Path) -> None:
    start_worker()
    rows, _ = clusters(5, seed=9)
    packed = torch.tensor(rows, dtype=torch.float32)
    encoded = {"dtype": "float32", "shape": [5, 4], "data": base64.b64encode(packed.numpy().tobytes()).decode()}
    output = celery_client().send_task("hypha.infer", kwargs={"model": "mlp", "inputs": encoded}).get(timeout=60)["output"]
    assert output["dtype"] == "float32" and output["shape"] == [5, 3]
    decoded = torch.frombuffer(bytearray(base64.b64decode(output["data"])), dtype=torch.float32).reshape(5, 3)
    assert torch.allclose(decoded, direct(model_dir, "mlp", rows), atol=1e-5)


def test_training_reports_progress_and_the_model_is_served(start_worker, celery_client, store_dir: Path) -> None:
    start_worker({"models": {"model_dir": str(store_dir)}})
    app = celery_client()
    rows, labels = clusters(900, seed=4)
    rows = [[v + (0.7 if i % 3 == 0 else -0.4) for v in row] for i, row in enumerate(rows)]
    job = app.send_task("hypha.train", kwargs={"model": "mlp", "data": {"inputs": rows, "targets": labels},
                                               "epochs": 150, "lr": 0.005, "batch_size": 16, "new_model": "mlp-tuned"})
    progress = []
    while not job.ready():
        if job.state == "PROGRESS" and (not progress or job.info != progress[-1]):
            progress.append(job.info)
        time.sleep(0.05)
    result = job.get(timeout=10)
    # Then the client saw at least 3 progress updates, the loss fell, and the new model serves at once
    assert len([p for p in progress if p.get("stage") == "run"]) >= 3, progress
    assert {"epoch", "step", "loss", "percent"} <= set(progress[-1])
    curve = result["output"]["loss_curve"]
    assert curve[-1] < curve[0] and result["output"]["final_loss"] == curve[-1]
    assert result["output"]["model_id"] == "mlp-tuned" and ModelStore(store_dir).manifest("mlp-tuned").parent == "mlp"
    served = app.send_task("hypha.infer", kwargs={"model": "mlp-tuned", "inputs": rows[:2]}).get(timeout=60)
    assert len(served["output"]) == 2


def test_memory_bomb_fails_while_a_concurrent_task_completes(start_worker, celery_client, store_dir: Path,
                                                              redis_client: redis.Redis) -> None:
    config = {"in_features": 4, "hidden": 500_000, "out_features": 3}
    ModelStore(store_dir).add("builtin", build("mlp", config), "wide", architecture="mlp", config=config, input_shape=[4])
    start_worker({"models": {"model_dir": str(store_dir)}, "resources": {"node_id": "bomb"}})
    app = celery_client()
    bomb = app.send_task("hypha.infer", kwargs={"model": "wide", "inputs": [[1.0, 2.0, 3.0, 4.0]] * 1000,
                                                "requirements": {"memory": "300MB", "cpu_cores": 0.5}})
    valid = app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": [[1.0, 2.0, 3.0, 4.0]],
                                                 "requirements": {"cpu_cores": 0.5}})
    with pytest.raises(MemoryLimitExceeded, match="more memory than it reserved"):
        bomb.get(timeout=120)
    assert valid.get(timeout=60)["model"] == "mlp"
    wait_for(lambda: not [lease for lease in Ledger(redis_client, "bomb").usage().leases if lease["k"] == "task"], 5,
             "the leases to be released")


def test_a_task_past_task_timeout_is_killed_and_its_lease_released(start_worker, celery_client,
                                                                   redis_client: redis.Redis) -> None:
    start_worker({"task_timeout": 3, "resources": {"node_id": "slow"}})
    app = celery_client()
    rows, labels = clusters(3000, seed=3)
    job = app.send_task("hypha.train", kwargs={"model": "mlp", "data": {"inputs": rows, "targets": labels},
                                               "epochs": 100_000, "batch_size": 8})
    with pytest.raises(TaskTimeout, match=r"task_timeout \(3s\)"):
        job.get(timeout=120)
    wait_for(lambda: not [lease for lease in Ledger(redis_client, "slow").usage().leases if lease["k"] == "task"], 5,
             "the lease to be released")
    # and the worker keeps serving
    assert app.send_task("hypha.noop", kwargs={}).get(timeout=30)["output"] is None
