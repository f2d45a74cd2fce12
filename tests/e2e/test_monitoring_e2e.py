"""Monitoring with real processes: Prometheus counts across pool processes, Flower's API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from hypha_celery.harness.launch import free_port, scrape, wait_for
from hypha_celery.tasks.base import HyphaTask
from tests.conftest import ROOT

SEED_METRICS = (
    "hypha_worker_tasks_active",
    "hypha_worker_tasks_completed_total",
    "hypha_worker_tasks_failed_total",
    "hypha_worker_cpu_utilization",
    "hypha_worker_memory_utilization",
    "hypha_worker_gpu_utilization",
    "hypha_worker_model_cache_hits_total",
    "hypha_worker_model_cache_misses_total",
)


def total(samples: dict[str, float], name: str) -> float:
    return sum(value for key, value in samples.items() if key == name or key.startswith(name + "{"))


def test_metrics_count_every_task_across_pool_processes(start_worker, celery_client, tmp_path: Path) -> None:
    # Given a prefork worker with 2 pool processes (recycled every 4 tasks), on a node NVML says has GPUs
    port = free_port()
    multiproc = tmp_path / "prom"
    fake_nvml = str(Path(__file__).parents[1] / "fake_nvml")
    start_worker({"monitoring": {"collect_metrics": True, "metrics_port": port, "monitor_interval": 0.5}},
                 args=("--pool", "prefork", "--concurrency", "2", "--max-tasks-per-child", "4"),
                 env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc),
                      "PYTHONPATH": fake_nvml + os.pathsep + os.environ.get("PYTHONPATH", "")})
    app = celery_client()
    # When 10 tasks succeed (two at a time, so both pool processes work) and 3 fail on purpose
    ok = [app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": [[1.0, 2.0, 3.0, float(i)]],
                                               "requirements": {"cpu_cores": 0.5}}) for i in range(6)]
    ok += [app.send_task("hypha.noop", kwargs={"hold_s": 0.3, "requirements": {"cpu_cores": 0.5}}) for _ in range(4)]
    bad = [app.send_task("hypha.infer", kwargs={"model": "no-such-model", "inputs": [[1.0]]}) for _ in range(3)]
    pids = {r.get(timeout=120)["metrics"].get("pid", 0) for r in ok}
    for result in bad:
        result.get(timeout=60, propagate=False)
        assert result.state == "FAILURE"
    # Then one scrape shows every seed metric, and the counts equal what ran, summed over all processes
    # (a task's outcome is counted just after its result is stored, so wait for both totals)
    samples = wait_for(lambda: total(s := scrape(port), "hypha_worker_tasks_failed_total") == 3
                       and total(s, "hypha_worker_tasks_completed_total") == 10 and s, 15, "metrics")
    for name in SEED_METRICS:
        assert any(key == name or key.startswith(name + "{") for key in samples), name
    assert total(samples, "hypha_worker_tasks_completed_total") == 10
    assert samples['hypha_worker_tasks_completed_total{task="hypha.infer"}'] == 6
    assert samples['hypha_worker_tasks_failed_total{error="UnsupportedModel",task="hypha.infer"}'] == 3
    assert samples['hypha_worker_gpu_utilization{device="0"}'] == 0.25
    assert samples["hypha_worker_tasks_active"] == 0
    assert total(samples, "hypha_worker_model_cache_hits_total") + total(samples, "hypha_worker_model_cache_misses_total") == 6
    # ... written by more than one pool process (and recycled ones were marked dead, not lost)
    writers = {path.name.rsplit("_", 1)[-1] for path in multiproc.glob("counter_*.db")}
    assert len(writers) >= 2, (writers, pids, sorted(p.name for p in multiproc.iterdir()))
    assert len(pids) >= 2


def test_flower_lists_the_worker_and_a_finished_task(start_worker, celery_client, redis_url: str) -> None:
    worker = start_worker()
    app = celery_client()
    port = free_port()
    env = dict(worker.env, FLOWER_UNAUTHENTICATED_API="true")
    log = open(worker.log.with_name("flower.log"), "wb")
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "hypha_celery", "flower", f"--port={port}",
                               "--address=127.0.0.1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def get(path: str) -> object:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return json.loads(response.read())

        def up() -> bool:
            try:
                return bool(get("/api/workers"))
            except OSError:
                return False

        wait_for(up, 60, "Flower to see the worker")
        result = app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": [[1.0, 2.0, 3.0, 4.0]]})
        stored = result.get(timeout=60)
        task_id = result.id
        workers = get("/api/workers")
        assert any(name.startswith(worker.name) for name in workers)  # type: ignore[union-attr]
        task = wait_for(lambda: (t := get(f"/api/task/info/{task_id}")) and t.get("state") == "SUCCESS" and t, 30,  # type: ignore[union-attr]
                        "Flower to see the task succeed")
        assert task["name"] == "hypha.infer" and task["worker"].startswith(worker.name)
        # Flower shows the result's first resultrepr_maxsize characters (then Celery's ", ...}}"); the backend keeps it all
        shown, whole = task["result"], repr(stored)
        assert shown.startswith("{'output': ") and len(shown) <= HyphaTask.resultrepr_maxsize + 20, shown
        assert len(whole) > HyphaTask.resultrepr_maxsize + 20 and stored["metrics"]["reserved"], stored
    finally:
        flower.terminate()
        flower.wait(30)
        log.close()
