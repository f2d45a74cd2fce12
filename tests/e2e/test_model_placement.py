"""Placement by model on a real redis-server: the registry advertises stores (adapters included) and
serving caches, and a request for a model or an adapter goes to a worker that holds it or its base."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from hypha_celery import keys, registry
from hypha_celery.keys import KeySchema
from hypha_celery.models.store import ModelStore
from hypha_celery.resources.capabilities import WorkerCapabilities
from hypha_celery.resources.ledger import Capacity, Ledger
from hypha_celery.resources.placement import Placement
from hypha_celery.resources.requirements import Requirements
from tests.unit.test_finetune import _adapter

GiB = 2**30
BASE, ADAPTER = "tiny-llama", "tiny-llama-lora"
SCHEMA = KeySchema()


def _worker(client: redis.Redis, node: str, *, memory: int = 8 * GiB, stored: Sequence[str] = (),
            loaded: tuple[str, ...] = (), adapters: dict[str, str] | None = None,
            published: registry.Published | None = None) -> str:
    """A node with its ledger's capacity and one worker whose record advertises what it holds (``published``:
    what that worker remembers writing, kept across its refreshes)."""
    Ledger(client, node, ttl=60).set_capacity(Capacity(cores=[0, 1], memory=memory))
    worker = f"celery@{node}"
    record = registry.WorkerRecord(worker_id=worker, node_id=node, queue=keys.worker_queue(worker),
                                   max_memory_per_task=memory, max_cpu_cores_per_task=2, gpu_sharing=False,
                                   verify_task_signatures=False, started_at=time.time())
    caps = WorkerCapabilities(cpu_cores=2, total_memory=memory, available_memory=memory, gpus=[], models=list(stored),
                              max_concurrent_tasks=2)
    registry.register(client, record, caps, None, ttl=60, adapters=adapters, loaded=loaded, published=published)
    return worker


def _holders(client: redis.Redis, model: str, tier: str = "stored") -> set[str]:
    return {worker.decode() for worker in client.zrange(SCHEMA.model_workers(model, tier), 0, -1)}


def _calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started, from INFO commandstats."""
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in client.info("commandstats").items()}


def _refresh_commands(client: redis.Redis, models: int) -> dict[str, int]:
    """The commands one refresh sends, after the first, for a worker holding ``models`` models (one adapter, one
    loaded)."""
    client.flushall()
    stored = [f"model-{index:04d}" for index in range(models)]
    worker = "celery@n1"
    record = registry.WorkerRecord(worker_id=worker, node_id="n1", queue=keys.worker_queue(worker),
                                   max_memory_per_task=GiB, max_cpu_cores_per_task=2, gpu_sharing=False,
                                   verify_task_signatures=False, started_at=time.time())
    caps = WorkerCapabilities(cpu_cores=2, total_memory=GiB, available_memory=GiB, gpus=[], models=stored,
                              max_concurrent_tasks=2)
    published = registry.Published()
    kwargs: dict[str, Any] = {"ttl": 60, "adapters": {stored[1]: stored[0]}, "loaded": [stored[0]],
                              "published": published}
    registry.register(client, record, caps, None, **kwargs)
    before = _calls(client)
    registry.register(client, record, caps, None, **kwargs)
    after = _calls(client)
    delta = {name: calls - before.get(name, 0) for name, calls in after.items() if calls - before.get(name, 0)}
    delta["info"] -= 1  # the reading above
    return {name: calls for name, calls in delta.items() if calls}


def test_the_record_lists_adapters_with_their_bases_and_what_is_loaded(redis_client: redis.Redis) -> None:
    # Given a worker whose store holds a base and an adapter of it, with the base in its serving cache
    worker = _worker(redis_client, "n1", stored=(BASE, ADAPTER), loaded=(BASE,), adapters={ADAPTER: BASE})
    # Then its record lists both models, maps the adapter to its base and names what is loaded
    [record] = registry.list_workers(redis_client)
    assert record["models"] == [BASE, ADAPTER] and record["adapters"] == {ADAPTER: BASE}
    assert record["loaded"] == [BASE]
    # And the model indexes name it, with the same expiry as its record
    assert redis_client.zscore(SCHEMA.model_workers(ADAPTER, "stored"), worker) is not None
    assert redis_client.zscore(SCHEMA.model_workers(BASE, "loaded"), worker) is not None
    assert redis_client.hget(SCHEMA.adapter_bases(), ADAPTER) == BASE.encode()
    # When it leaves, Then it leaves the model indexes too
    registry.deregister(redis_client, worker, "n1")
    assert redis_client.zcard(SCHEMA.model_workers(ADAPTER, "stored")) == 0
    assert redis_client.zcard(SCHEMA.model_workers(BASE, "loaded")) == 0


def test_an_adapter_request_goes_to_a_worker_holding_its_base(redis_client: redis.Redis) -> None:
    # Given equal nodes, one holding nothing (first in best-fit order), one with the base in its store,
    # and a full node that holds the adapter itself (so the network knows the adapter's base)
    empty = _worker(redis_client, "a-empty")
    holder = _worker(redis_client, "b-base", stored=(BASE,))
    _worker(redis_client, "c-full", stored=(BASE, ADAPTER), adapters={ADAPTER: BASE})
    Ledger(redis_client, "c-full", ttl=60).reserve(Requirements(memory=8 * GiB), holder="busy")
    placement = Placement(redis_client)
    request = Requirements(memory=GiB)
    # When a request names no model, Then best fit alone decides: the node that holds nothing
    assert placement.choose(request).worker == empty
    # When it names the adapter, Then the worker holding its base wins (the adapter's own holder has no room)
    assert placement.choose(request, model=ADAPTER).worker == holder
    assert placement.choose(request, model=BASE).worker == holder
    # And a model nobody holds is placed by best fit
    assert placement.choose(request, model="other").worker == empty
    # And excluding the holder (a worker deferring it) falls back to best fit
    assert placement.choose(request, model=ADAPTER, exclude=holder).worker == empty


def test_a_base_in_a_serving_cache_beats_the_base_or_the_adapter_in_a_store(redis_client: redis.Redis) -> None:
    # Given the adapter in one worker's store, the base in another's, and the base loaded on a third
    # (the loosest fit of the three)
    _worker(redis_client, "a-adapter", stored=(BASE, ADAPTER), adapters={ADAPTER: BASE})
    _worker(redis_client, "b-base", stored=(BASE,))
    loaded = _worker(redis_client, "c-loaded", memory=16 * GiB, stored=(BASE,), loaded=(BASE,))
    placement = Placement(redis_client)
    # When the adapter is asked for, Then the worker whose cache holds the base wins
    assert placement.choose(Requirements(memory=GiB), model=ADAPTER).worker == loaded
    # When the loaded worker cannot fit the request now, Then the adapter's own holder is next
    Ledger(redis_client, "c-loaded", ttl=60).reserve(Requirements(memory=15 * GiB), holder="busy")
    assert placement.choose(Requirements(memory=2 * GiB), model=ADAPTER).worker == "celery@a-adapter"


def test_a_dead_holder_is_not_preferred(redis_client: redis.Redis) -> None:
    # Given the only holder of the base, whose live-index entry has expired (killed -9: no deregister) while
    # its record lingers
    empty = _worker(redis_client, "a-empty")
    holder = _worker(redis_client, "b-base", stored=(BASE,))
    redis_client.zadd(SCHEMA.workers(), {holder: time.time() - 1})
    placement = Placement(redis_client)
    # When the base is asked for, Then best fit decides, and the entry stays while the record does
    assert placement.choose(Requirements(memory=GiB), model=BASE).worker == empty
    assert _holders(redis_client, BASE) == {holder}
    # When its record is gone too (its TTL lapsed), Then placement still passes it over, and drops its entry
    redis_client.delete(SCHEMA.worker(holder))
    assert placement.choose(Requirements(memory=GiB), model=BASE).worker == empty
    assert _holders(redis_client, BASE) == set()


def test_an_unchanged_refresh_sends_no_per_model_command(own_redis: redis.Redis) -> None:
    # Given a worker holding 3 models and one holding 300, each refreshed once already
    few, many = _refresh_commands(own_redis, 3), _refresh_commands(own_redis, 300)
    # Then a refresh with the same model set sends the same commands for both: the record and the live
    # indexes, no model index
    assert few == many, (few, many)
    assert many.get("zadd") == 2 and "zrem" not in many and "set" not in many and "persist" not in many, many
    assert sum(many.values()) == 9, many  # multi, hget, hset, hsetnx, 2 expire, 2 zadd, exec


def test_a_removed_model_leaves_the_index_at_the_next_refresh(redis_client: redis.Redis) -> None:
    # Given a worker holding the base and the adapter, the base loaded
    published = registry.Published()
    worker = _worker(redis_client, "n1", stored=(BASE, ADAPTER), loaded=(BASE,), adapters={ADAPTER: BASE},
                     published=published)
    assert _holders(redis_client, ADAPTER) == {worker} and _holders(redis_client, BASE, "loaded") == {worker}
    # When its store drops the adapter and its cache the base
    _worker(redis_client, "n1", stored=(BASE,), published=published)
    # Then the next refresh takes it out of those indexes, and its record says so
    assert _holders(redis_client, ADAPTER) == set() and _holders(redis_client, BASE, "loaded") == set()
    assert _holders(redis_client, BASE) == {worker}
    [record] = registry.list_workers(redis_client)
    assert record["models"] == [BASE] and record["loaded"] == [] and record["adapters"] == {}


def test_entries_come_back_after_the_redis_data_is_flushed(redis_client: redis.Redis) -> None:
    # Given a worker holding the base, refreshed once
    published = registry.Published()
    worker = _worker(redis_client, "n1", stored=(BASE,), loaded=(BASE,), published=published)
    # When Redis loses everything (a restart without persistence), and the worker refreshes with the same models
    redis_client.flushdb()  # the test's database alone: CI's Redis holds other processes' too
    _worker(redis_client, "n1", stored=(BASE,), loaded=(BASE,), published=published)
    # Then its record lists them and the indexes name it again: placement prefers it
    assert _holders(redis_client, BASE) == {worker} and _holders(redis_client, BASE, "loaded") == {worker}
    [record] = registry.list_workers(redis_client)
    assert record["models"] == [BASE] and record["loaded"] == [BASE]
    _worker(redis_client, "a-empty")
    assert Placement(redis_client).choose(Requirements(memory=GiB), model=BASE).worker == worker


def test_a_restored_snapshot_is_repaired_at_the_next_refresh(redis_client: redis.Redis) -> None:
    # Given a worker that held the adapter when a snapshot was taken, then dropped it
    published = registry.Published()
    worker = _worker(redis_client, "n1", stored=(BASE, ADAPTER), published=published)
    snapshot = {key: redis_client.dump(key) for key in redis_client.keys("*")}
    _worker(redis_client, "n1", stored=(BASE,), published=published)
    # When Redis comes back from that snapshot, and the worker refreshes with its model set unchanged since
    redis_client.flushdb()  # the test's database alone: CI's Redis holds other processes' too
    for key, value in snapshot.items():
        redis_client.restore(key, 0, value)
    assert _holders(redis_client, ADAPTER) == {worker}
    _worker(redis_client, "n1", stored=(BASE,), published=published)
    # Then the indexes hold what it holds now
    assert _holders(redis_client, ADAPTER) == set() and _holders(redis_client, BASE) == {worker}
    assert registry.list_workers(redis_client)[0]["models"] == [BASE]


def test_a_restarted_worker_leaves_what_it_no_longer_holds(redis_client: redis.Redis) -> None:
    # Given a worker that held the adapter, then restarted (nothing remembered) without it, its record still live
    worker = _worker(redis_client, "n1", stored=(BASE, ADAPTER), published=registry.Published())
    _worker(redis_client, "n1", stored=(BASE,), published=registry.Published())
    # Then its first registration takes it out of the adapter's index
    assert _holders(redis_client, ADAPTER) == set() and _holders(redis_client, BASE) == {worker}


def test_prune_takes_a_gone_worker_out_of_the_model_indexes(redis_client: redis.Redis) -> None:
    # Given a holder killed -9: its record's TTL lapsed, its live-index entry expired
    holder = _worker(redis_client, "n1", stored=(BASE,), loaded=(BASE,))
    redis_client.delete(SCHEMA.worker(holder))
    redis_client.zadd(SCHEMA.workers(), {holder: time.time() - 1})
    # When the registry is pruned (list_workers, the CLI)
    assert registry.prune(redis_client) == [holder]
    # Then it is in no model index, and its list of them is gone
    assert _holders(redis_client, BASE) == set() and _holders(redis_client, BASE, "loaded") == set()
    assert not redis_client.exists(SCHEMA.worker_indexes(holder))


def test_a_worker_advertises_its_adapters_and_what_it_serves(start_worker, celery_client, redis_client: redis.Redis,
                                                              model_dir: Path, tmp_path: Path) -> None:
    # Given a store with the tiny Llama and a LoRA adapter of it, and a worker on that store
    store_dir = tmp_path / "store"
    shutil.copytree(model_dir, store_dir, ignore=shutil.ignore_patterns(".locks"))
    _adapter(ModelStore(store_dir), ADAPTER, 1, tmp_path)
    start_worker({"models": {"model_dir": str(store_dir)}, "network": {"advertisement_interval": 1}})
    # When the adapter generates through it
    celery_client().send_task("hypha.generate", kwargs={"model": ADAPTER, "prompt": "the cat", "max_new_tokens": 2,
                                                        "requirements": {"cpu_cores": 1}}).get(timeout=120)
    # Then its record lists the adapter among its models, with its base, and (at the next refresh) the base
    # and the adapter as loaded; placement sends the next request for the adapter to it
    deadline = time.monotonic() + 30
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        [record] = registry.list_workers(redis_client)
        if {BASE, ADAPTER} <= set(record["loaded"]):
            break
        time.sleep(0.2)
    assert ADAPTER in record["models"] and BASE in record["models"]
    assert record["adapters"] == {ADAPTER: BASE} and {BASE, ADAPTER} <= set(record["loaded"]), record
    worker = record["worker_id"]
    assert redis_client.zscore(SCHEMA.model_workers(ADAPTER, "loaded"), worker) is not None
    assert Placement(redis_client).choose(Requirements(memory=GiB // 4), model=ADAPTER).worker == worker
