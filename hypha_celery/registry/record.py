"""A worker's record in Redis: one hash per worker, a live index, and readers.

Key schema: :mod:`hypha_celery.keys` (each call takes a ``schema``; without
one, ``$HYPHA_KEY_PREFIX`` is read at the call). A record is written in one MULTI/EXEC
transaction (fields, TTL and index entries together), so a reader never sees
half of one. The hash expires ``3 x advertisement_interval`` after its last
refresh, so a worker killed -9 disappears by itself; readers prune index
entries whose hash is gone.

Fields: every :class:`~hypha_celery.resources.capabilities.WorkerCapabilities` field
(scalars as numbers, lists and maps as JSON), plus ``worker_id``, ``node_id``,
``queue``, ``hostname``, ``pid``, ``started_at``, ``last_updated`` (unix
seconds), the per-task limits, and ``free_*`` (what the node's ledger had free
at the last refresh; :func:`list_workers` reads it live). ``avg_inference_time``
is there from the first write (``{}`` until a task was timed); only
:class:`~hypha_celery.registry.inference_times.InferenceTimes` changes it after that.

``models`` lists every entry of the worker's store, LoRA adapters included;
``adapters`` maps each adapter among them to its base's id and ``loaded`` lists
what its serving executors hold in memory now. The same transaction indexes
them for placement (``hypha:model:<id>:stored`` / ``:loaded``, worker -> expiry,
and ``hypha:adapter_bases``), so a scheduler finds the workers holding a model
or an adapter's base without reading records.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from hypha_celery.keys import KeySchema
from hypha_celery.redis_errors import redis_errors
from hypha_celery.resources.ledger import Ledger, Usage

if TYPE_CHECKING:  # a scheduler reads records without the worker's psutil
    from hypha_celery.resources.capabilities import WorkerCapabilities

__all__ = ["WorkerRecord", "decode_record", "deregister", "encode_record", "list_workers", "prune", "register"]

_JSON_FIELDS = ("gpus", "models", "avg_inference_time", "free_gpu_memory", "adapters", "loaded")
_FLOAT_FIELDS = ("last_updated", "started_at", "expires_at", "free_cpu_cores")
_INT_FIELDS = (
    "cpu_cores", "total_memory", "available_memory", "max_concurrent_tasks", "pid",
    "max_memory_per_task", "max_cpu_cores_per_task", "free_memory", "cache_hits", "cache_misses",
)
_AVERAGES = "avg_inference_time"
_UNREACHABLE = "registry Redis unreachable"


@dataclass(frozen=True)
class WorkerRecord:
    """What a worker advertises besides its capabilities."""

    worker_id: str
    node_id: str
    queue: str
    max_memory_per_task: int
    max_cpu_cores_per_task: int
    gpu_sharing: bool
    verify_task_signatures: bool
    started_at: float
    hostname: str = socket.gethostname()


def encode_record(
    record: WorkerRecord,
    caps: WorkerCapabilities,
    usage: Usage | None,
    now: float,
    ttl: float,
    extra: Mapping[str, int] | None = None,
    *,
    adapters: Mapping[str, str] | None = None,
    loaded: Sequence[str] = (),
) -> dict[str, str]:
    """The hash fields for one worker: numbers as plain numbers, lists and maps as JSON."""
    data: dict[str, Any] = caps.to_json()
    data["adapters"] = dict(adapters or {})
    data["loaded"] = sorted(loaded)
    data.pop(_AVERAGES)  # owned by InferenceTimes.flush, never overwritten by a refresh
    data.update({
        "worker_id": record.worker_id,
        "node_id": record.node_id,
        "queue": record.queue,
        "hostname": record.hostname,
        "pid": os.getpid(),
        "started_at": record.started_at,
        "last_updated": now,
        "expires_at": now + ttl,
        "max_memory_per_task": record.max_memory_per_task,
        "max_cpu_cores_per_task": record.max_cpu_cores_per_task,
        "gpu_sharing": int(record.gpu_sharing),
        "verify_task_signatures": int(record.verify_task_signatures),
    })
    data.update(extra or {})
    if usage is not None and usage.capacity is not None:
        data["free_memory"] = usage.memory_free
        data["free_cpu_cores"] = len(usage.capacity.cores) - usage.cores_used
        data["free_gpu_memory"] = {
            str(gpu): total - usage.gpu_memory_used.get(gpu, 0) for gpu, total in usage.capacity.gpus.items()
        }
    return {key: json.dumps(value) if key in _JSON_FIELDS else _scalar(value) for key, value in data.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def decode_record(raw: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    """A record as Python values: numbers as numbers, JSON fields parsed."""
    record: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else key
        text = value.decode() if isinstance(value, bytes) else value
        if name in _JSON_FIELDS:
            record[name] = json.loads(text)
        elif name in _INT_FIELDS:
            record[name] = int(float(text))
        elif name in _FLOAT_FIELDS:
            record[name] = float(text)
        elif name in ("gpu_sharing", "verify_task_signatures"):
            record[name] = text == "1"
        else:
            record[name] = text
    record.setdefault(_AVERAGES, {})
    return record


def register(
    client: redis.Redis,
    record: WorkerRecord,
    caps: WorkerCapabilities,
    usage: Usage | None,
    *,
    ttl: float,
    extra: Mapping[str, int] | None = None,
    adapters: Mapping[str, str] | None = None,
    loaded: Sequence[str] = (),
    schema: KeySchema | None = None,
) -> float:
    """Write (or refresh) a worker's record and index entries in one transaction; returns the time written.

    A new record gets ``avg_inference_time`` from ``caps`` (``{}`` when nothing was timed) in
    the same transaction; a refresh leaves the field to ``InferenceTimes``. ``adapters``
    (adapter id -> base id) and ``loaded`` (models held in memory) feed placement by model.
    """
    schema = schema or KeySchema.from_env()
    now = time.time()
    fields: dict[Any, Any] = encode_record(record, caps, usage, now, ttl, extra, adapters=adapters, loaded=loaded)
    held = [(schema.model_workers(model, "stored"), model) for model in caps.models]
    held += [(schema.model_workers(model, "loaded"), model) for model in loaded]
    key = schema.worker(record.worker_id)
    node_workers = schema.node_workers(record.node_id)
    with redis_errors(_UNREACHABLE), client.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping=fields)
        pipe.hsetnx(key, _AVERAGES, json.dumps(caps.avg_inference_time))
        pipe.expire(key, max(1, int(ttl + 0.999)))
        pipe.zadd(schema.workers(), {record.worker_id: now + ttl})
        pipe.zadd(node_workers, {record.worker_id: now + ttl})
        pipe.expire(node_workers, max(1, int(ttl + 0.999)))
        for index, _ in held:  # an entry lives as long as the record; a dropped model's entry expires
            pipe.zremrangebyscore(index, "-inf", now)
            pipe.zadd(index, {record.worker_id: now + ttl})
            pipe.expire(index, max(1, int(ttl + 0.999)))
        if adapters:
            bases: dict[Any, Any] = dict(adapters)
            pipe.hset(schema.adapter_bases(), mapping=bases)
        pipe.execute()
    return now


def deregister(client: redis.Redis, worker_id: str, node_id: str, *, schema: KeySchema | None = None) -> None:
    """Remove a worker's record; the last worker of a node also takes the node out of placement."""
    schema = schema or KeySchema.from_env()
    now = time.time()
    node_workers = schema.node_workers(node_id)
    with redis_errors(_UNREACHABLE):
        models, loaded = client.hmget(schema.worker(worker_id), ["models", "loaded"])
        with client.pipeline(transaction=True) as pipe:
            for tier, raw in (("stored", models), ("loaded", loaded)):
                for model in json.loads(raw) if raw else []:
                    pipe.zrem(schema.model_workers(model, tier), worker_id)
            pipe.delete(schema.worker(worker_id))
            pipe.zrem(schema.workers(), worker_id)
            pipe.zrem(node_workers, worker_id)
            pipe.zcount(node_workers, now, "+inf")
            remaining = pipe.execute()[-1]
        if not remaining:
            _drop_node(client, node_id, schema)


def _drop_node(client: redis.Redis, node_id: str, schema: KeySchema) -> None:
    with client.pipeline(transaction=True) as pipe:
        for index in schema.placement().values():
            pipe.zrem(index, node_id)
        pipe.execute()


def prune(client: redis.Redis, now: float | None = None, *, schema: KeySchema | None = None) -> list[str]:
    """Drop index entries of workers whose record expired; returns their ids.

    Their nodes leave the placement indexes when placement next meets them
    (``lua/place.lua``), and ``hypha:node:<node>:workers`` entries expire with
    their scores.
    """
    schema = schema or KeySchema.from_env()
    now = time.time() if now is None else now
    with redis_errors(_UNREACHABLE):
        stale = [_text(w) for w in client.zrangebyscore(schema.workers(), "-inf", now)]
        if not stale:
            return []
        with client.pipeline(transaction=False) as pipe:
            for worker_id in stale:
                pipe.exists(schema.worker(worker_id))
            alive = pipe.execute()
        # A record that still exists was refreshed after this index entry was read.
        gone = [worker_id for worker_id, exists in zip(stale, alive, strict=True) if not exists]
        if gone:
            client.zrem(schema.workers(), *gone)
    return gone


def list_workers(client: redis.Redis, *, live_usage: bool = True, schema: KeySchema | None = None) -> list[dict[str, Any]]:
    """Every live worker's record, with its node's free resources read from the ledger now."""
    schema = schema or KeySchema.from_env()
    prune(client, schema=schema)
    with redis_errors(_UNREACHABLE):
        ids = [_text(w) for w in client.zrangebyscore(schema.workers(), time.time(), "+inf")]
        with client.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(schema.worker(worker_id))
            raws = pipe.execute()
    workers = [decode_record(raw) for raw in raws if raw]
    if live_usage:
        usages: dict[str, Usage] = {}
        for worker in workers:
            node = worker.get("node_id", "")
            if node not in usages:
                usages[node] = Ledger(client, node, schema=schema).usage()
            usage = usages[node]
            if usage.capacity is not None:
                worker["free_memory"] = usage.memory_free
                worker["free_cpu_cores"] = len(usage.capacity.cores) - usage.cores_used
                worker["free_gpu_memory"] = {
                    str(g): total - usage.gpu_memory_used.get(g, 0) for g, total in usage.capacity.gpus.items()
                }
                worker["leases"] = len(usage.leases)
    return sorted(workers, key=lambda w: w["worker_id"])
