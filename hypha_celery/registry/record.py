"""A worker's record in Redis: one hash per worker, a live index, and readers.

Key schema: :mod:`hypha_celery.keys` (each call takes a ``schema``; without
one, ``$HYPHA_KEY_PREFIX`` is read at the call). A record is written in one MULTI/EXEC
transaction (fields, TTL and index entries together), so a reader never sees
half of one. The hash expires ``3 x advertisement_interval`` after its last
refresh, so a worker killed -9 disappears by itself; readers prune index
entries whose hash is gone.

Fields: every :class:`~hypha_celery.resources.capabilities.WorkerCapabilities` field
(scalars as numbers, lists and maps as JSON), plus ``worker_id``, ``node_id``,
``queue``, ``hostname``, ``pid``, ``shared_storage`` (1 when it has DiLoCo's shared storage and takes
its rounds), ``peer_id`` (the identity that signs its results, empty when
it signs none), ``started_at``, ``last_updated`` (unix
seconds), the per-task limits, and ``free_*`` (what the node's ledger had free
at the last refresh; :func:`list_workers` reads it live), and ``kv``: each device's KV budget,
what is held of it and by which tasks (:class:`~hypha_celery.resources.ledger.KvBudget`, read
live too). ``avg_inference_time``
is there from the first write (``{}`` until a task was timed); only
:class:`~hypha_celery.registry.inference_times.InferenceTimes` changes it after that.

``models`` lists every entry of the worker's store, LoRA adapters included;
``adapters`` maps each adapter among them to its base's id and ``loaded`` lists
what its serving executors hold in memory now. The same transaction indexes
them for placement (``hypha:model:<id>:stored`` / ``:loaded``, membership only,
and ``hypha:adapter_bases``), so a scheduler finds the workers holding a model
or an adapter's base without reading records. A refresh costs what changed, not
what is held: the worker remembers what it last wrote (:class:`Published`) and
sends only the difference, stamping the record's ``index_version``; these three
fields are rewritten only when they change. Liveness is the live index's, so a
dead worker's entries are ignored by placement and pruned lazily (placement,
:func:`deregister`, :func:`prune`). When the record's ``index_version`` is not
the one the worker last wrote (its record expired, Redis was flushed or restored
from a snapshot, or a refresh failed half-way), the worker republishes all of it
and takes itself out of the indexes ``hypha:worker_indexes:<id>`` still names.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from hypha_celery.keys import KeySchema
from hypha_celery.redis_errors import redis_errors
from hypha_celery.resources.ledger import Ledger, Usage

if TYPE_CHECKING:  # a scheduler reads records without the worker's psutil
    from hypha_celery.resources.capabilities import WorkerCapabilities

__all__ = ["PEERS_KEPT_S", "Published", "WorkerRecord", "decode_record", "deregister", "encode_record", "list_workers",
           "prune", "register", "registered_peer"]

_JSON_FIELDS = ("gpus", "models", "avg_inference_time", "free_gpu_memory", "adapters", "loaded", "kv")
_FLOAT_FIELDS = ("last_updated", "started_at", "expires_at", "free_cpu_cores")
_INT_FIELDS = (
    "cpu_cores", "total_memory", "available_memory", "max_concurrent_tasks", "pid",
    "max_memory_per_task", "max_cpu_cores_per_task", "free_memory", "cache_hits", "cache_misses",
    "shared_storage",
)
_AVERAGES = "avg_inference_time"
_LISTED = ("models", "adapters", "loaded")  # rewritten only when they change, with the model indexes
_VERSION = "index_version"
_UNREACHABLE = "registry Redis unreachable"
PEERS_KEPT_S = 7 * 24 * 3600  # hypha:peers lives this long past the last new registration


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
    peer_id: str | None = None  # the worker's identity, whose key signs its results (None: results unsigned)


@dataclass
class Published:
    """What one worker last wrote to the model indexes (its own, in memory), so a refresh sends only changes.

    ``version`` is ``None`` until a write is known to have landed: then the next
    :func:`register` republishes everything.
    """

    version: str | None = None
    indexes: frozenset[str] = frozenset()
    listed: dict[str, str] = field(default_factory=dict)
    bases: dict[str, str] = field(default_factory=dict)

    def forget(self) -> None:
        """Whatever Redis holds is unknown now (a write failed): republish at the next refresh."""
        self.version, self.indexes, self.listed, self.bases = None, frozenset(), {}, {}


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
        "peer_id": record.peer_id or "",
    })
    data.update(extra or {})
    if usage is not None and usage.capacity is not None:
        data["free_memory"] = usage.memory_free
        data["free_cpu_cores"] = len(usage.capacity.cores) - usage.cores_used
        data["free_gpu_memory"] = {
            str(gpu): total - usage.gpu_memory_used.get(gpu, 0) for gpu, total in usage.capacity.gpus.items()
        }
        data["kv"] = {device: budget.to_json() for device, budget in usage.kv.items()}
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
        elif name == "peer_id":
            record[name] = text or None
        else:
            record[name] = text
    record.setdefault(_AVERAGES, {})
    record.setdefault("models", [])  # a record recreated after it expired gets these back at once
    record.setdefault("adapters", {})
    record.setdefault("loaded", [])
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
    published: Published | None = None,
    schema: KeySchema | None = None,
) -> float:
    """Write (or refresh) a worker's record and index entries in one transaction; returns the time written.

    A new record gets ``avg_inference_time`` from ``caps`` (``{}`` when nothing was timed) in
    the same transaction; a refresh leaves the field to ``InferenceTimes``. ``adapters``
    (adapter id -> base id) and ``loaded`` (models held in memory) feed placement by model.
    ``published`` is what this worker last wrote (kept by the caller across refreshes): with
    it, an unchanged model set costs no per-model command; without it, everything is written.
    """
    schema = schema or KeySchema.from_env()
    state = published if published is not None else Published()
    now = time.time()
    fields: dict[Any, Any] = encode_record(record, caps, usage, now, ttl, extra, adapters=adapters, loaded=loaded)
    listed = {name: fields[name] for name in _LISTED}
    held = json.dumps({"stored": sorted(set(caps.models)), "loaded": sorted(set(loaded))})
    indexes = _indexes_of(schema, held)
    bases = dict(adapters or {})
    known = state.version is not None
    changed = not known or indexes != state.indexes or listed != state.listed
    version = state.version if state.version is not None and not changed else uuid.uuid4().hex[:16]
    if changed:
        fields[_VERSION] = version
    else:
        for name in _LISTED:
            del fields[name]
    key = schema.worker(record.worker_id)
    node_workers = schema.node_workers(record.node_id)
    try:
        with redis_errors(_UNREACHABLE), client.pipeline(transaction=True) as pipe:
            pipe.hget(key, _VERSION)
            pipe.hset(key, mapping=fields)
            pipe.hsetnx(key, _AVERAGES, json.dumps(caps.avg_inference_time))
            pipe.expire(key, max(1, int(ttl + 0.999)))
            pipe.zadd(schema.workers(), {record.worker_id: now + ttl})
            pipe.zadd(node_workers, {record.worker_id: now + ttl})
            pipe.expire(node_workers, max(1, int(ttl + 0.999)))
            if known:
                _index(pipe, schema, record.worker_id, now, indexes - state.indexes, state.indexes - indexes,
                       {adapter: base for adapter, base in bases.items() if state.bases.get(adapter) != base}, held)
            elif record.peer_id:  # its identity outlives its record: a gone worker's signatures stay checkable
                pipe.hset(schema.peers(), record.worker_id, record.peer_id)
                pipe.expire(schema.peers(), PEERS_KEPT_S)
            prior = pipe.execute()[0]
        if not known or _text_or_none(prior) != state.version:
            _republish(client, schema, record.worker_id, now, held, bases, {**listed, _VERSION: version})
    except BaseException:
        state.forget()
        raise
    state.version, state.indexes, state.listed, state.bases = version, indexes, listed, bases
    return now


def registered_peer(client: redis.Redis, worker_id: str, *, schema: KeySchema | None = None) -> str | None:
    """The peer id ``worker_id`` registered with (its identity, whose key signs its results and token streams);
    None for a worker that never registered one. Still known after the worker's record expired."""
    schema = schema or KeySchema.from_env()
    with redis_errors(_UNREACHABLE):
        value = client.hget(schema.peers(), worker_id)
    return None if value is None else _text(value)


def _text_or_none(value: Any) -> str | None:
    return None if value is None else _text(value)


def _indexes_of(schema: KeySchema, held: Any) -> frozenset[str]:
    """The model index keys a ``hypha:worker_indexes:<id>`` value (JSON ``{"stored": [ids], "loaded": [ids]}``) names."""
    models = json.loads(held) if held else {}
    return frozenset(schema.model_workers(model, tier) for tier, ids in models.items() for model in ids)


def _index(pipe: Any, schema: KeySchema, worker_id: str, now: float, added: frozenset[str],
           removed: frozenset[str], bases: Mapping[str, str], held: str) -> None:
    """Queue the model index changes: the worker joins ``added`` and leaves ``removed``; ``held`` lists them all."""
    for index in sorted(added):
        pipe.zadd(index, {worker_id: now})
    for index in sorted(removed):
        pipe.zrem(index, worker_id)
    if added or removed:
        pipe.set(schema.worker_indexes(worker_id), held)
    if bases:
        pipe.hset(schema.adapter_bases(), mapping=dict(bases))


def _republish(client: redis.Redis, schema: KeySchema, worker_id: str, now: float, held: str,
               bases: Mapping[str, str], fields: Mapping[str, str]) -> None:
    """Make Redis hold exactly this worker's model set again: join every index it holds, leave the rest."""
    indexes = _indexes_of(schema, held)
    with redis_errors(_UNREACHABLE):
        before = _indexes_of(schema, client.get(schema.worker_indexes(worker_id)))
        with client.pipeline(transaction=True) as pipe:
            record: dict[Any, Any] = dict(fields)
            pipe.hset(schema.worker(worker_id), mapping=record)
            for index in sorted(indexes):
                pipe.persist(index)  # a key written by an older version may carry a TTL
            _index(pipe, schema, worker_id, now, indexes, before - indexes, bases, held)
            pipe.execute()


def deregister(client: redis.Redis, worker_id: str, node_id: str, *, schema: KeySchema | None = None) -> None:
    """Remove a worker's record; the last worker of a node also takes the node out of placement."""
    schema = schema or KeySchema.from_env()
    now = time.time()
    node_workers = schema.node_workers(node_id)
    with redis_errors(_UNREACHABLE):
        own = schema.worker_indexes(worker_id)
        indexes = _indexes_of(schema, client.get(own))
        with client.pipeline(transaction=True) as pipe:
            for index in indexes:
                pipe.zrem(index, worker_id)
            pipe.delete(schema.worker(worker_id), own)
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
    """Drop index entries of workers whose record expired, model indexes included; returns their ids.

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
            _drop_models(client, gone, schema)
            client.zrem(schema.workers(), *gone)
    return gone


def _drop_models(client: redis.Redis, gone: list[str], schema: KeySchema) -> None:
    """Take workers whose record expired out of the model indexes (once per worker: its list goes too)."""
    with client.pipeline(transaction=False) as pipe:
        for worker_id in gone:
            pipe.get(schema.worker_indexes(worker_id))
        held = pipe.execute()
    with client.pipeline(transaction=False) as pipe:
        for worker_id, indexes in zip(gone, held, strict=True):
            for index in _indexes_of(schema, indexes):
                pipe.zrem(index, worker_id)
            pipe.delete(schema.worker_indexes(worker_id))
            pipe.hdel(schema.worker(worker_id), _VERSION)  # came back meanwhile? it republishes next refresh
        pipe.execute()


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
                worker["kv"] = {device: budget.to_json() for device, budget in usage.kv.items()}
    return sorted(workers, key=lambda w: w["worker_id"])
