"""A generation's KV cache through a real worker: admitted against the device's KV budget, deferred when it is
full, served once the holder leaves; the budget and its holders visible in the registry (``hypha-celery workers``)."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from hypha_celery.harness.launch import wait_for
from hypha_celery.models.examples import TINY_LLAMA
from hypha_celery.models.store import ModelStore
from hypha_celery.registry import list_workers
from hypha_celery.resources.ledger import Ledger
from hypha_celery.resources.requirements import Requirements
from hypha_celery.stages.sizing import prompt_token_bound

PROMPT = "The cat sat on"
NEW_TOKENS = 8
NODE = "kv-e2e"


def _kv_bytes(model_dir: Path) -> int:
    """The KV cache sizing gives this request on the CPU (fp32): prompt bound + new tokens, times bytes per token."""
    manifest = ModelStore(model_dir).manifest(TINY_LLAMA)
    per_token = manifest.kv_bytes_per_token_at("float32")
    assert per_token
    return per_token * (prompt_token_bound(PROMPT, None, manifest.max_length) + NEW_TOKENS)


def _node_kv(client: redis.Redis) -> dict:
    workers = [w for w in list_workers(client) if w.get("node_id") == NODE]
    assert workers, "the worker's record"
    return workers[0]["kv"]["cpu"]


def test_a_generation_waits_for_a_full_kv_budget_and_runs_once_the_holder_leaves(
        start_worker, celery_client, redis_client: redis.Redis, model_dir: Path) -> None:
    # Given a worker whose CPU admits one and a half of this generation's KV cache
    kv = _kv_bytes(model_dir)
    start_worker({"generation": {"kv_budget": str(kv * 3 // 2)}, "resources": {"node_id": NODE}})
    app = celery_client()
    ledger = Ledger(redis_client, NODE, ttl=60)
    # ... and another request holding a whole such KV cache of it
    other = ledger.reserve(Requirements(cpu_milli=10, memory=2**20, kv=kv), holder="another generation")
    assert (_node_kv(redis_client)["used"], _node_kv(redis_client)["holders"]) == (kv, ["another generation"])
    # When a generation names no requirements (auto: its KV cache, a fraction of a core)
    sent = app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "prompt": PROMPT, "max_new_tokens": NEW_TOKENS})
    # Then it waits, deferred on the KV budget, not failed and not run
    wait_for(lambda: app.backend.get_task_meta(sent.id)["status"] == "WAITING", 60, "the generation to be deferred")
    assert "KV budget is full" in app.backend.get_task_meta(sent.id)["result"]["reason"]
    time.sleep(1.0)  # a few backoff rounds: still waiting while the budget stays full
    assert not sent.ready()
    # When the other request leaves, it is served
    ledger.release(other)
    result = sent.get(timeout=120)
    assert result["output"]["usage"]["completion_tokens"] >= 1
    # ... having held its KV cache on the CPU and a tenth of a core, not a whole one
    reserved = result["metrics"]["reserved"]
    assert (reserved["kv"], reserved["kv_devices"], reserved["cpu_milli"]) == (kv, ["cpu"], 100)
    # ... and once it ended, nothing holds the budget
    wait_for(lambda: _node_kv(redis_client)["used"] == 0, 10, "the KV cache to be released")
    assert _node_kv(redis_client)["budget"] == kv * 3 // 2
