"""Every Redis key hypha-celery reads or writes, in one place.

Registry (one record per worker, written by the registry bootstep)::

    hypha:worker:<worker_id>          hash   the worker's capabilities; TTL 3 x advertisement_interval
    hypha:workers                     zset   worker_id -> unix time its record expires (live index)
    hypha:node:<node>:workers         zset   worker_id -> expiry, the workers sharing one node's ledger
    hypha:queue_owners                zset   worker_id -> when its own queue stops being consumed (2 x
                                             lease_heartbeat after its sweeper's last mark; kept an hour)
    hypha:sweeper                     string the queue sweeper's lock: the one worker sweeping now

Models (what each worker holds, for placement by model; written with the worker's record when it changes)::

    hypha:model:<model>:stored        zset   worker_id -> when it joined, workers whose store holds the model
                                             (membership only: liveness is hypha:workers; no TTL)
    hypha:model:<model>:loaded        zset   worker_id -> when it joined, workers whose serving cache holds it
    hypha:worker_indexes:<worker_id>  string JSON {"stored": [ids], "loaded": [ids]}: the model indexes above that
                                             name the worker (no TTL; lets a returning worker, deregister and
                                             prune take it out of them)
    hypha:adapter_bases               hash   adapter id -> the id of its base model (ids are immutable)
    hypha:peers                       hash   worker_id -> the peer id of its identity as it last registered (kept
                                             7 days past the last new registration: what checks the signature
                                             of a worker that has since gone, e.g. on its token stream)

Ledger (one per node, i.e. per host; shared by every worker process on it)::

    hypha:node:<node>:capacity        hash   spec: JSON {"memory", "cores": [ids], "gpus": [[id, bytes]], "sharing",
                                             "kv" (each device's KV budget in bytes; 0: auto)}
    hypha:node:<node>:used            hash   memory, mc (host model cache bytes, within memory), c<core>
                                             (millicores), shared, g<i> (task bytes), gc<i> (model cache
                                             bytes), gh<i>/gx<i> (holders / exclusive holders), kvcpu/kv<i>
                                             (KV-cache bytes held against the CPU's / GPU i's KV budget)
    hypha:node:<node>:leases          zset   lease_id -> expiry (ms, Redis server clock)
    hypha:node:<node>:lease_data      hash   lease_id -> JSON of what the lease holds
    hypha:task:<task_id>:lease        string lease id running that task (duplicate-run guard), PX = lease TTL;
                                             "done" for 60 s after its release

Placement indexes (node -> number; kept exact by the ledger's Lua scripts)::

    hypha:index:free_memory           free bytes of memory
    hypha:index:free_core_milli       free millicores of the shared CPU pool (a fraction fits these)
    hypha:index:free_whole_cores      whole cores that may leave the shared pool now
    hypha:index:free_gpus             GPUs nobody holds
    hypha:index:free_gpu_memory       most free bytes on one GPU that nobody holds alone (a request sharing a
                                             device by gpu_memory could take them)
    hypha:index:cap_memory, cap_cores, cap_gpus, cap_gpu_memory   capacities, for "infeasible anywhere"

Security::

    hypha:nonce:<key_id>:<nonce>      string  JSON {"task", "seen", "delivered", "done"} of a seen envelope nonce;
                                              kept until issued_at + the replay window (security/verifier.py)

Token streams (on the result backend's Redis, not the registry's; :mod:`hypha_celery.token_stream`)::

    hypha:task:<task_id>:tokens       stream a generation's tokens as they come, then an end entry with the task's
                                             status; MAXLEN ~ [worker.generation] stream_maxlen, expires with
                                             the task's result (Celery's result_expires)
    hypha:task:<task_id>:rng          string  "<tokens>:<device>:<base64>": a seeded sampled generation's random
                                             generator state after that many tokens (what continuing it on
                                             another worker needs); rewritten with each stream write, same expiry

DiLoCo::

    hypha:diloco:<job>:<round>:aggregate  string  the lock one outer step of that round holds while it runs
                                              (redis-py ``Lock``; expires after the task's hard time limit)

This module is the only source of these names. The Lua scripts build none:
each receives the keys it touches in ``KEYS``, in the order its header lists
(:meth:`KeySchema.ledger`, :meth:`KeySchema.placement`; see
:mod:`hypha_celery.lua`). The one exception is ``place.lua``, which meets node
names while it scans and so gets the two halves of ``node_workers`` around
the node (:meth:`KeySchema.node_workers_affixes`).

All keys live on one Redis (``registry_url``): the ledger's Lua scripts touch a
node's keys and the global indexes in one atomic step. In a Redis Cluster, give
every key the same hash tag by setting ``HYPHA_KEY_PREFIX={hypha}``. The
variable is read when a ledger, placement, verifier or registry call is built
(:meth:`KeySchema.from_env`), not when this module is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "CAPACITY_INDEXES",
    "DEFAULT_PREFIX",
    "FREE_INDEXES",
    "PREFIX_VARIABLE",
    "KeySchema",
    "index_capacity",
    "index_free",
    "lease_data",
    "leases",
    "node_capacity",
    "node_used",
    "node_workers",
    "nonce",
    "schema",
    "task_guard",
    "token_rng",
    "token_stream",
    "worker",
    "worker_queue",
    "workers",
]

DEFAULT_PREFIX = "hypha"
PREFIX_VARIABLE = "HYPHA_KEY_PREFIX"

# Short names of the placement indexes, in the order the Lua scripts receive them.
FREE_INDEXES = ("memory", "core_milli", "whole_cores", "gpus", "gpu_memory")
CAPACITY_INDEXES = ("memory", "cores", "gpus", "gpu_memory")


@dataclass(frozen=True)
class KeySchema:
    """The key names under one prefix; build one where a ledger, placement or registry call is set up."""

    prefix: str = DEFAULT_PREFIX

    @classmethod
    def from_env(cls) -> KeySchema:
        """The schema for ``$HYPHA_KEY_PREFIX`` as it is now (``hypha`` when unset)."""
        return cls(os.environ.get(PREFIX_VARIABLE, DEFAULT_PREFIX))

    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def queue_owners(self) -> str:
        return f"{self.prefix}:queue_owners"

    def sweeper_lock(self) -> str:
        return f"{self.prefix}:sweeper"

    def model_workers(self, model: str, tier: str) -> str:
        """Workers holding ``model``: ``tier`` ``stored`` (in the store) or ``loaded`` (in a serving cache)."""
        return f"{self.prefix}:model:{model}:{tier}"

    def worker_indexes(self, worker_id: str) -> str:
        """Which model indexes (:meth:`model_workers`) name ``worker_id``, as JSON by tier."""
        return f"{self.prefix}:worker_indexes:{worker_id}"

    def adapter_bases(self) -> str:
        return f"{self.prefix}:adapter_bases"

    def peers(self) -> str:
        """Each worker's registered identity (peer id), kept after its record expires."""
        return f"{self.prefix}:peers"

    def worker_affixes(self) -> tuple[str, str]:
        """What comes before and after the worker id in :meth:`worker` (``place.lua`` joins them)."""
        return f"{self.prefix}:worker:", ""

    def node_workers(self, node: str) -> str:
        head, tail = self.node_workers_affixes()
        return f"{head}{node}{tail}"

    def node_workers_affixes(self) -> tuple[str, str]:
        """What comes before and after the node in :meth:`node_workers` (``place.lua`` joins them)."""
        return f"{self.prefix}:node:", ":workers"

    def node_capacity(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:capacity"

    def node_used(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:used"

    def leases(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:leases"

    def lease_data(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:lease_data"

    def task_guard(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}:lease"

    def token_stream(self, task_id: str) -> str:
        """The Redis Stream of task ``task_id``'s generated tokens (in the result backend's Redis)."""
        return f"{self.prefix}:task:{task_id}:tokens"

    def token_rng(self, task_id: str) -> str:
        """Task ``task_id``'s generator state after its streamed tokens (a seeded sampled generation only)."""
        return f"{self.prefix}:task:{task_id}:rng"

    def nonce(self, key_id: str, value: str) -> str:
        return f"{self.prefix}:nonce:{key_id}:{value}"

    def aggregate_lock(self, job: str, round_: int) -> str:
        """The lock of DiLoCo job ``job``'s outer step of round ``round_``."""
        return f"{self.prefix}:diloco:{job}:{round_}:aggregate"

    def index_free(self) -> dict[str, str]:
        """Short name (``memory``, ``core_milli``, ...) -> the index of what is free now."""
        return {name: f"{self.prefix}:index:free_{name}" for name in FREE_INDEXES}

    def index_capacity(self) -> dict[str, str]:
        """Short name (``memory``, ``cores``, ...) -> the index of what nodes have in all."""
        return {name: f"{self.prefix}:index:cap_{name}" for name in CAPACITY_INDEXES}

    def ledger(self, node: str) -> dict[str, str]:
        """The ``KEYS`` every ledger script starts with, by the name ``lua/prelude.lua`` binds, in order."""
        return {
            "capacity": self.node_capacity(node),
            "used": self.node_used(node),
            "leases": self.leases(node),
            "lease_data": self.lease_data(node),
            **{f"free_{name}": key for name, key in self.index_free().items()},
        }

    def placement(self) -> dict[str, str]:
        """Every placement index by the name ``lua/place.lua`` binds, in its ``KEYS`` order."""
        return {
            **{f"free_{name}": key for name, key in self.index_free().items()},
            **{f"cap_{name}": key for name, key in self.index_capacity().items()},
        }


def schema() -> KeySchema:
    """The schema for ``$HYPHA_KEY_PREFIX`` as it is now (``KeySchema.from_env``)."""
    return KeySchema.from_env()


def worker_queue(worker_id: str) -> str:
    """The queue only ``worker_id`` consumes (not a Redis key: a broker queue name)."""
    return f"hypha.worker.{worker_id}"


# The same names for callers with no schema at hand (tools, tests): each reads the prefix now.

def workers() -> str:
    return schema().workers()


def worker(worker_id: str) -> str:
    return schema().worker(worker_id)


def node_workers(node: str) -> str:
    return schema().node_workers(node)


def node_capacity(node: str) -> str:
    return schema().node_capacity(node)


def node_used(node: str) -> str:
    return schema().node_used(node)


def leases(node: str) -> str:
    return schema().leases(node)


def lease_data(node: str) -> str:
    return schema().lease_data(node)


def task_guard(task_id: str) -> str:
    return schema().task_guard(task_id)


def token_stream(task_id: str) -> str:
    return schema().token_stream(task_id)


def token_rng(task_id: str) -> str:
    return schema().token_rng(task_id)


def nonce(key_id: str, value: str) -> str:
    return schema().nonce(key_id, value)


def index_free() -> dict[str, str]:
    return schema().index_free()


def index_capacity() -> dict[str, str]:
    return schema().index_capacity()
