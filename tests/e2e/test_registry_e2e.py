"""Capability advertisement with real workers and a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import redis

from hypha_celery import keys
from hypha_celery.harness.embedded_redis import EmbeddedRedis
from hypha_celery.resources.ledger import Ledger
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
INTERVAL = 2  # advertisement_interval in the test config
FIELDS = {"cpu_cores", "total_memory", "available_memory", "gpus", "models", "max_concurrent_tasks",
          "last_updated", "queue", "node_id", "worker_id"}


def cli_workers(url: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "hypha_celery.cli", "workers", "--json", "--registry", url],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    return json.loads(out.stdout)


def test_worker_registers_refreshes_and_leaves_on_sigterm(start_worker, redis_client: redis.Redis) -> None:
    # Given a worker that just said it is ready
    worker = start_worker()
    worker_id = f"{worker.name}@{os.uname().nodename}"
    key = keys.worker(worker_id)
    # Then its record was written before it said so (no later than a second after), with every field
    wait_for(lambda: redis_client.exists(key), 10, "the registry record")
    ready_line = next(line for line in worker.output().splitlines() if line.endswith("ready."))
    ready_at = datetime.strptime(ready_line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert float(redis_client.hget(key, "last_updated")) <= ready_at + 1.0
    fields = {k.decode() for k in redis_client.hgetall(key)}
    assert FIELDS <= fields
    assert redis_client.hget(key, "queue").decode() == f"hypha.worker.{worker_id}"
    assert 0 < redis_client.ttl(key) <= 3 * INTERVAL
    # And last_updated advances every interval
    first = float(redis_client.hget(key, "last_updated"))
    wait_for(lambda: float(redis_client.hget(key, "last_updated") or 0) > first, 2 * INTERVAL + 1, "a refresh")
    # When it gets SIGTERM, Then the record is removed
    assert worker.stop() == 0
    assert not redis_client.exists(key)
    assert redis_client.zscore(keys.workers(), worker_id) is None


def test_a_killed_worker_disappears_by_itself(start_worker, redis_client: redis.Redis, redis_url: str) -> None:
    worker = start_worker()
    worker_id = f"{worker.name}@{os.uname().nodename}"
    wait_for(lambda: redis_client.exists(keys.worker(worker_id)), 5, "the registry record")
    assert [w["worker_id"] for w in cli_workers(redis_url)] == [worker_id]
    # When it is killed -9
    worker.kill9()
    # Then its record expires within 3 x interval (its TTL says so) and `hypha-celery workers` no longer lists it
    assert 0 < redis_client.ttl(keys.worker(worker_id)) <= 3 * INTERVAL
    wait_for(lambda: not redis_client.exists(keys.worker(worker_id)), 30, "the record to expire")
    assert cli_workers(redis_url) == []
    assert redis_client.zscore(keys.workers(), worker_id) is None  # the reader pruned the index


def test_two_workers_each_with_its_own_queue(start_worker, celery_client, redis_url: str) -> None:
    a, b = start_worker(), start_worker()
    listed = wait_for(lambda: len(cli_workers(redis_url)) == 2 and cli_workers(redis_url), 10, "both workers")
    queues = {w["worker_id"]: w["queue"] for w in listed}
    assert len(set(queues.values())) == 2
    app = celery_client()
    for worker_id, queue in queues.items():
        result = app.send_task("hypha.noop", kwargs={}, queue=queue).get(timeout=60)
        assert result["worker"] == worker_id
    assert a.alive() and b.alive()


def test_worker_survives_a_redis_restart_and_registers_again(start_worker, tmp_path: Path) -> None:
    # Given a worker whose broker, results and registry are one Redis we can restart
    with EmbeddedRedis() as server:
        worker = start_worker(broker=server.url, backend=server.url, env={"HYPHA_REGISTRY_URL": server.url})
        client = redis.Redis.from_url(server.url)
        worker_id = f"{worker.name}@{os.uname().nodename}"
        wait_for(lambda: client.exists(keys.worker(worker_id)), 5, "the registry record")
        # When Redis restarts empty
        server.restart()
        client = redis.Redis.from_url(server.url)
        assert not client.exists(keys.worker(worker_id))
        # Then the worker keeps running and is registered again within an interval (plus reconnect time)
        wait_for(lambda: client.exists(keys.worker(worker_id)), INTERVAL + 8, "re-registration")
        assert worker.alive()
        # ... and its node's capacity is back in the ledger (the monitor republishes it)
        node = client.hget(keys.worker(worker_id), "node_id").decode()
        wait_for(lambda: Ledger(client, node).capacity() is not None, 5, "the ledger capacity again")
        client.close()


def test_gpus_from_nvml_and_no_cuda_in_the_worker_process(start_worker, celery_client, redis_client) -> None:
    # Given a worker on a node whose NVML reports two H200s
    fake = str(Path(__file__).parents[1] / "fake_nvml")
    worker = start_worker(env={"PYTHONPATH": fake + os.pathsep + os.environ.get("PYTHONPATH", "")})
    worker_id = f"{worker.name}@{os.uname().nodename}"
    wait_for(lambda: redis_client.exists(keys.worker(worker_id)), 5, "the registry record")
    gpus = json.loads(redis_client.hget(keys.worker(worker_id), "gpus"))
    assert [(g["index"], g["model"], g["compute_capability"]) for g in gpus] == [(0, "NVIDIA H200", "9.0"),
                                                                                (1, "NVIDIA H200", "9.0")]
    # When it has run an ML task
    app = celery_client()
    app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": [[1.0, 2.0, 3.0, 4.0]]}).get(timeout=60)
    # Then its own process never imported torch, so no CUDA context exists to break forked children
    [reply] = app.control.broadcast("hypha_capabilities", destination=[worker_id], reply=True, timeout=5)
    report = reply[worker_id]
    assert report["process"] == {"pid": worker.pid, "torch_imported": False, "cuda_initialized": False}
    assert [g["index"] for g in report["capabilities"]["gpus"]] == [0, 1]
    assert report["ledger"]["capacity"]["gpus"] == {"0": 150_754_820_096, "1": 150_754_820_096}
