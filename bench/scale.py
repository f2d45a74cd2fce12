"""The registry at scale: placement among 10,000 and 100,000 nodes, Redis memory per worker, a refresh's cost.

Everything here runs against the bench's real Redis in this process (no worker
processes): the nodes and workers are written by the same code a worker uses
(:meth:`Ledger.set_capacity`, :func:`hypha_celery.registry.register`), and a
refresh is :class:`~hypha_celery.worker.bootsteps.RegistryStep`'s own.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import redis

from bench.common import REPEATS, fmt, hypha_config, record, say, spread
from bench.counts import RedisCounter
from hypha_celery import keys, lua
from hypha_celery.resources.ledger import Capacity, Ledger
from hypha_celery.resources.placement import SCAN_LIMIT, Placement
from hypha_celery.resources.requirements import Requirements

__all__ = ["bench_placement", "bench_registry"]

_BATCH = 1000  # nodes written per pipeline while registering


def _ping_ms(client: redis.Redis, n: int = 500) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.ping()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _forget(client: redis.Redis, schema: keys.KeySchema) -> None:
    """Delete every key under ``schema``'s prefix, so later steps' workers never see (or place on) these nodes."""
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{schema.prefix}:*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def _register_nodes(client: redis.Redis, rng: random.Random, first: int, last: int, schema: keys.KeySchema) -> None:
    """Nodes ``first..last-1``: random capacities, half of them partly busy, one live worker each."""
    expires = time.time() + 3600
    setup = lua.script("set_capacity", prelude=True)
    client.script_load(setup.text)  # a pipeline runs it by SHA and cannot load it on the way
    for start in range(first, last, _BATCH):
        batch = range(start, min(last, start + _BATCH))
        with client.pipeline(transaction=False) as pipe:
            for index in batch:
                node = f"n{index:06d}"
                gpus = {g: rng.choice([24, 40, 80, 141]) * 10**9 for g in range(rng.choice([0, 0, 1, 2, 4, 8]))}
                Ledger(pipe, node, ttl=3600, schema=schema).set_capacity(
                    Capacity(cores=list(range(rng.choice([4, 8, 16, 32, 64]))),
                             memory=rng.choice([16, 32, 64, 128, 256]) * 2**30, gpus=gpus))
                worker = f"w{index:06d}@host"
                pipe.zadd(schema.node_workers(node), {worker: expires})
                pipe.zadd(schema.workers(), {worker: expires})
            pipe.execute()
        for index in batch:
            if rng.random() < 0.5:  # half the nodes are partly busy
                result = Ledger(client, f"n{index:06d}", ttl=3600, schema=schema).try_reserve(
                    Requirements(cpu_milli=2000, memory=rng.choice([4, 8, 12]) * 2**30), holder="busy")
                del result  # a node too small to be busy stays idle


def _time_choices(client: redis.Redis, requests: list[Requirements], schema: keys.KeySchema) -> dict[str, Any]:
    placement = Placement(client, schema=schema)
    medians, found, p99 = [], 0, 0.0
    for _ in range(REPEATS):
        times = []
        for req in requests:
            t0 = time.perf_counter()
            choice = placement.choose(req)
            times.append((time.perf_counter() - t0) * 1000)
            found += choice is not None
        medians.append(statistics.median(times))
        p99 = sorted(times)[int(len(times) * 0.99)]
    return {"medians": medians, "found": found, "p99": p99}


def bench_placement(url: str) -> None:
    """``choose()`` among 10,000 registered nodes, then among 100,000 (the same 10,000 and 90,000 more)."""
    say("\n[3] placement among 10,000 and 100,000 registered nodes (real Redis, indexes kept by the ledger)")
    client = redis.Redis.from_url(url)
    schema = keys.KeySchema("bench-placement")  # its own prefix: no worker of a later step places on these
    rng = random.Random(7)
    requests = [Requirements(cpu_milli=rng.choice([250, 1000, 4000]), memory=rng.choice([1, 8, 30, 100]) * 2**30,
                             gpus=rng.choice([0, 0, 1, 2]), gpu_memory=rng.choice([0, 20 * 10**9, 70 * 10**9]))
                for _ in range(500)]
    registered = 0
    for nodes in (10_000, 100_000):
        started = time.perf_counter()
        _register_nodes(client, rng, registered, nodes, schema)
        registered = nodes
        say(f"    registered {nodes - (10_000 if nodes > 10_000 else 0)} more nodes in "
            f"{time.perf_counter() - started:.1f}s ({nodes} in all)")
        timed = _time_choices(client, requests, schema)
        nowhere = _time_choices(client, [Requirements(cpu_milli=100_000, memory=2**20)], schema)  # no node has 100 cores
        ping = _ping_ms(client)
        median = statistics.median(timed["medians"])
        say(f"    {nodes:>7} nodes: choose() median of runs {fmt(timed['medians'], 'ms')}  (p99 last run "
            f"{timed['p99']:.2f} ms; PING median {ping:.3f} ms; {timed['found']} of {len(requests) * REPEATS} placed)")
        say(f"    median {median:.2f} ms (target < 5 ms); a request no node fits (100 cores, answered from the "
            f"indexes' best scores, no walk of up to {SCAN_LIMIT} candidates): {statistics.median(nowhere['medians']):.2f} ms")
        record(f"placement_{nodes // 1000}k", ratio=median / ping, target="median < 5 ms", met=median < 5.0,
               unit="choose() median / PING median", median_ms=median, runs_ms=spread(timed["medians"]), ping_ms=ping,
               p99_ms=timed["p99"], nodes=nodes, nowhere_ms=statistics.median(nowhere["medians"]),
               placed=timed["found"], requests=len(requests) * REPEATS)
    _forget(client, schema)
    client.close()


# --- registry memory and refresh ------------------------------------------------------------------------

def _worker_keys(schema: keys.KeySchema, worker: str, node: str) -> dict[str, str]:
    """The keys one worker (alone on its node) owns, by what they hold."""
    return {"record": schema.worker(worker), "node_workers": schema.node_workers(node),
            "capacity": schema.node_capacity(node), "used": schema.node_used(node),
            "leases": schema.leases(node), "lease_data": schema.lease_data(node),
            "model_indexes": schema.worker_indexes(worker)}


def _shared_keys(schema: keys.KeySchema) -> list[str]:
    """The keys every worker adds an entry to (live index, placement indexes, the bench's models' indexes)."""
    held = [schema.model_workers(model, tier) for model in ("mlp", "tiny-llama", "tiny-bert-embedder")
            for tier in ("stored", "loaded")]
    return [schema.workers(), *schema.placement().values(), *held]


def _memory_per_worker(client: redis.Redis, caps: Any, workers: int) -> dict[str, Any]:
    """Redis memory per registered worker (each on its own node, one task lease held), two ways."""
    from hypha_celery import registry

    schema = keys.KeySchema(f"bench-registry-{random.randrange(10**6)}")
    client.script_load(lua.script("set_capacity", prelude=True).text)  # pipelines run it by SHA only
    before = int(client.info("memory")["used_memory"])
    ttl = 180.0
    for start in range(0, workers, _BATCH):
        with client.pipeline(transaction=False) as pipe:
            for index in range(start, min(workers, start + _BATCH)):
                node = f"node{index:06d}"
                Ledger(pipe, node, schema=schema).set_capacity(
                    Capacity(cores=list(range(16)), memory=64 * 2**30, gpus={0: 80 * 10**9}))
            pipe.execute()
        for index in range(start, min(workers, start + _BATCH)):
            node, worker = f"node{index:06d}", f"bench-{index:06d}@host"
            ledger = Ledger(client, node, ttl=ttl, schema=schema)
            ledger.reserve(Requirements(cpu_milli=1000, memory=2**30), holder=worker, task_id=f"task-{index}")
            rec = registry.WorkerRecord(worker_id=worker, node_id=node, queue=keys.worker_queue(worker),
                                        max_memory_per_task=2**30, max_cpu_cores_per_task=4, gpu_sharing=False,
                                        verify_task_signatures=True, started_at=time.time())
            registry.register(client, rec, caps, ledger.usage(), ttl=ttl, schema=schema)
    used = int(client.info("memory")["used_memory"]) - before
    one = {name: int(client.memory_usage(key) or 0)
           for name, key in _worker_keys(schema, "bench-000000@host", "node000000").items()}
    one["task_guard"] = int(client.memory_usage(schema.task_guard("task-0")) or 0)
    shared = sum(int(client.memory_usage(key) or 0) for key in _shared_keys(schema)) / workers
    _forget(client, schema)
    return {"used_memory_delta_per_worker": used / workers, "keys_of_one": one, "index_entries_per_worker": shared,
            "memory_usage_per_worker": sum(one.values()) + shared, "workers": workers}


STORE_ENTRIES = 300  # entries in the refreshing worker's store, so what a refresh costs per model shows


def _store_of(models: Path, into: Path, entries: int) -> Path:
    """A store with ``models``' entries (linked) and more, up to ``entries``: copies of one manifest, no weights
    (listing the store and reading a manifest is all a refresh does with an entry)."""
    from hypha_celery.manifest import MODEL_MANIFEST

    into.mkdir(parents=True, exist_ok=True)
    real = sorted(entry for entry in models.iterdir() if (entry / MODEL_MANIFEST).is_file()) if models.is_dir() else []
    for entry in real:
        (into / entry.name).symlink_to(entry.resolve())
    if real:
        manifest = json.loads((real[0] / MODEL_MANIFEST).read_text())
        for index in range(max(0, entries - len(real))):
            model_id = f"bench-entry-{index:04d}"
            (into / model_id).mkdir()
            (into / model_id / MODEL_MANIFEST).write_text(json.dumps({**manifest, "id": model_id}))
    return into


def _refresh_cost(url: str, client: redis.Redis, models: Path, refreshes: int) -> dict[str, Any]:
    """What one ``RegistryStep.refresh`` (the worker's own, on a real node context) costs Redis."""
    from hypha_celery.config import parse_config
    from hypha_celery.resources.capabilities import detect_capabilities, node_capacity
    from hypha_celery.worker.bootsteps import RegistryStep
    from hypha_celery.worker.context import NodeContext

    config = parse_config({"worker": hypha_config(models, network={"registry_url": url})})
    ctx = NodeContext.build(config)
    try:
        ctx.ledger.set_capacity(Capacity(cores=[0, 1], memory=8 * 2**30))
        step = RegistryStep(SimpleNamespace())
        consumer = SimpleNamespace(controller=SimpleNamespace(hypha=ctx), hostname="bench-refresh@host",
                                   timer=SimpleNamespace(call_repeatedly=lambda *a, **k: SimpleNamespace(cancel=lambda: None)))
        step.start(consumer)  # the first registration
        ctx.inference_times.observe("mlp", 0.01)
        step.refresh()  # loads the averages script: counted below are refreshes as they run from then on
        counter = RedisCounter(client)
        counter.start()
        t0 = time.perf_counter()
        for index in range(refreshes):
            ctx.inference_times.observe("mlp", 0.01 + index * 1e-6)  # a task was timed: the averages are written too
            step.refresh()
        elapsed = (time.perf_counter() - t0) / refreshes * 1000
        delta = counter.stop()
        t0 = time.perf_counter()
        for _ in range(refreshes):  # the part of a refresh that reads this machine, not Redis
            detect_capabilities(config, ctx.store.list(), capacity=node_capacity(config))
        local = (time.perf_counter() - t0) / refreshes * 1000
        step.shutdown(consumer)
    finally:
        ctx.close()
    return {"ms": elapsed, "local_ms": local, **delta.per(refreshes)}


def bench_registry(url: str, models: Path) -> None:
    """Redis memory per registered worker, and one registry refresh in commands, bytes and PING times.

    The refreshing worker's store is ``models`` (the bench's example models) plus manifest-only entries up to
    ``STORE_ENTRIES``, so a cost per model would show; its model set does not change between refreshes.
    """
    from hypha_celery.config import parse_config
    from hypha_celery.resources.capabilities import detect_capabilities

    say("\n[12] registry at scale: Redis memory per registered worker; what one refresh costs")
    client = redis.Redis.from_url(url)
    caps = detect_capabilities(parse_config({"worker": hypha_config(models)}), ["mlp", "tiny-llama", "tiny-bert-embedder"],
                               {"mlp": 0.002, "tiny-llama": 0.4})
    memory = _memory_per_worker(client, caps, 10_000)
    per_worker = memory["used_memory_delta_per_worker"]
    breakdown = ", ".join(f"{name} {size}" for name, size in memory["keys_of_one"].items())
    say(f"    INFO memory delta over {memory['workers']} workers: {per_worker:,.0f} bytes per worker "
        f"({per_worker * 10_000 / 2**20:.0f} MiB for 10,000; {per_worker * 100_000 / 2**20:.0f} MiB for 100,000)")
    say(f"    MEMORY USAGE of one worker's keys: {breakdown} bytes; its entries in the shared indexes "
        f"{memory['index_entries_per_worker']:.0f} bytes; {memory['memory_usage_per_worker']:,.0f} in all")
    record("registry_memory", ratio=per_worker / 1024, target="reported", met=True,
           unit="KiB of Redis memory per registered worker (INFO used_memory delta)", **memory)

    refreshes = 200
    store = Path(tempfile.mkdtemp(prefix="hypha-bench-store-"))
    try:
        held = _store_of(models, store / "models", STORE_ENTRIES)
        entries = len(list(held.iterdir()))
        cost = _refresh_cost(url, client, held, refreshes)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    ping = _ping_ms(client)
    ratio = cost["ms"] / ping
    names = ", ".join(f"{name} {calls:.2f}" for name, calls in cost["commands"].items())
    say(f"    one refresh of a worker whose store holds {entries} entries, none changing: "
        f"{cost['round_trips']:.2f} round trips, {cost['total_commands']:.2f} commands ({names}), "
        f"{cost['bytes_in']:.0f} bytes to Redis and {cost['bytes_out']:.0f} back")
    on_redis = max(0.0, cost["ms"] - cost["local_ms"])
    say(f"    one refresh takes {cost['ms']:.3f} ms = {ratio:.1f} PINGs ({ping:.3f} ms), of which reading this machine "
        f"(psutil, NVML, the model store) {cost['local_ms']:.3f} ms and the rest, {on_redis / ping:.1f} PINGs, encoding "
        f"and sending; at 10,000 workers refreshing every 60 s: {10_000 / 60 * cost['round_trips']:.0f} round trips/s, "
        f"{10_000 / 60 * (cost['bytes_in'] + cost['bytes_out']) / 1024:.0f} KiB/s")
    record("registry_refresh", ratio=ratio, target="reported", met=True,
           unit="one RegistryStep.refresh / one PING (time)", refresh_ms=cost["ms"], ping_ms=ping,
           redis_part_pings=on_redis / ping, refreshes=refreshes, store_entries=entries,
           **{k: v for k, v in cost.items() if k != "ms"})
    client.close()
