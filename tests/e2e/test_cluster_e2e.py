"""A real worker whose registry and ledger are a 3-primary Redis Cluster.

Broker and result backend stay on a plain Redis (kombu has no Redis Cluster
transport); the registry, the ledger, placement and the CLI talk to the cluster
through :func:`hypha_celery.redis_client.registry_client`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch

from hypha_celery import keys, registry
from hypha_celery.client import submit
from hypha_celery.resources.ledger import Ledger
from hypha_celery.resources.requirements import Requirements
from hypha_celery.routing import placement_for
from tests.conftest import CLUSTER_PREFIX, ROOT, wait_for
from tests.e2e.test_worker_e2e import ROWS, direct


def test_a_worker_on_a_cluster_registry_runs_noop_and_infer(
    start_worker, celery_client, cluster_client: redis.Redis, redis_client: redis.Redis,
    redis_cluster_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a worker whose registry is the cluster (broker and results on the plain Redis)
    worker = start_worker(env={"HYPHA_REGISTRY_URL": redis_cluster_url, "HYPHA_KEY_PREFIX": CLUSTER_PREFIX})
    worker_id = f"{worker.name}@{os.uname().nodename}"
    # Then it registered in the cluster, and nothing of the registry went to the plain Redis
    wait_for(lambda: registry.list_workers(cluster_client), 10, "the worker's record in the cluster")
    [listed] = registry.list_workers(cluster_client)
    assert listed["worker_id"] == worker_id and listed["free_memory"] > 0
    assert not redis_client.exists(keys.worker(worker_id)) and not redis_client.exists(keys.workers())
    # When a scheduler with the same registry URL submits a noop, placement reads the cluster
    monkeypatch.setenv("HYPHA_REGISTRY_URL", redis_cluster_url)
    choice = placement_for().choose(Requirements.parse({"memory": "100MB"}))
    assert choice is not None and choice.worker == worker_id
    app = celery_client()
    noop = submit("hypha.noop", requirements={"memory": "100MB"}, app=app)
    # Then it ran on the worker placement chose
    noop.get(timeout=60)
    assert noop.state == "SUCCESS"
    # When an inference on the built-in mlp model is sent to the shared queue
    infer = app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": ROWS})
    result = infer.get(timeout=60)
    # Then it ran the real model
    assert torch.allclose(torch.tensor(result["output"]), direct(model_dir, "mlp", ROWS), atol=1e-5)
    # ... both ran under a lease of the node's ledger in the cluster, and gave it back
    for task_id in (noop.id, infer.id):
        wait_for(lambda task_id=task_id: cluster_client.get(keys.task_guard(task_id)) == b"done", 30,
                 f"task {task_id}'s lease to be released in the cluster")
    usage = Ledger(cluster_client, listed["node_id"]).usage()
    assert usage.capacity is not None
    assert not [lease for lease in usage.leases if lease.get("task_id") in (noop.id, infer.id)]
    # ... and the CLI lists the worker from the cluster
    out = subprocess.run([sys.executable, "-m", "hypha_celery.cli", "workers", "--json",
                          "--registry", redis_cluster_url], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, check=True, env={**os.environ, "HYPHA_KEY_PREFIX": CLUSTER_PREFIX})
    assert [w["worker_id"] for w in json.loads(out.stdout)] == [worker_id]
    # When it stops, Then its record leaves the cluster
    assert worker.stop() == 0
    assert registry.list_workers(cluster_client) == []


def test_a_worker_refuses_a_cluster_registry_without_a_hash_tag_prefix(
    start_worker, redis_cluster_url: str,
) -> None:
    # Given a cluster registry and the default key prefix
    worker = start_worker(env={"HYPHA_REGISTRY_URL": redis_cluster_url, "HYPHA_KEY_PREFIX": "hypha"}, wait=False)
    # When it starts, Then it stops with EX_CONFIG and a line naming HYPHA_KEY_PREFIX
    assert worker.process.wait(60) == 78
    assert "config error: HYPHA_KEY_PREFIX: " in worker.output()
    assert "HYPHA_KEY_PREFIX={hypha}" in worker.output()
