"""Every Redis key hypha-celery reads or writes, in one place.

Registry (one record per worker, written by the registry bootstep)::

    hypha:worker:<worker_id>          hash   the worker's capabilities; TTL 3 x advertisement_interval
    hypha:workers                     zset   worker_id -> unix time its record expires (live index)
    hypha:node:<node>:workers         zset   worker_id -> expiry, the workers sharing one node's ledger

Ledger (one per node, i.e. per host; shared by every worker process on it)::

    hypha:node:<node>:capacity        hash   spec: JSON {"memory", "cores": [ids], "gpus": [[id, bytes]], "sharing"}
    hypha:node:<node>:used            hash   memory, c<core> (millicores), g<i> (task bytes), gc<i> (model
                                             cache bytes), gh<i>/gx<i> (holders / exclusive holders)
    hypha:node:<node>:leases          zset   lease_id -> expiry (ms, Redis server clock)
    hypha:node:<node>:lease_data      hash   lease_id -> JSON of what the lease holds
    hypha:task:<task_id>:lease        string lease id running that task (duplicate-run guard), PX = lease TTL;
                                             "done" for 60 s after its release

Placement indexes (node -> number; kept exact by the ledger's Lua scripts)::

    hypha:index:free_memory           free bytes of memory
    hypha:index:free_core_milli       most free millicores on any one core
    hypha:index:free_whole_cores      cores nobody holds
    hypha:index:free_gpus             GPUs nobody holds
    hypha:index:free_gpu_memory       most free bytes on one GPU (that an exclusive task could take)
    hypha:index:cap_memory, cap_cores, cap_gpus, cap_gpu_memory   capacities, for "infeasible anywhere"

Security::

    hypha:nonce:<key_id>:<nonce>      string  seen envelope nonce; expires with the envelope

All keys live on one Redis (``registry_url``): the ledger's Lua scripts touch a
node's keys and the global indexes in one atomic step. In a Redis Cluster, give
every key the same hash tag by setting ``HYPHA_KEY_PREFIX={hypha}``.
"""

from __future__ import annotations

import os

__all__ = [
    "INDEX_CAPACITY",
    "INDEX_FREE",
    "PREFIX",
    "WORKERS",
    "lease_data",
    "leases",
    "node_capacity",
    "node_used",
    "node_workers",
    "nonce",
    "task_guard",
    "worker",
    "worker_queue",
]

PREFIX = os.environ.get("HYPHA_KEY_PREFIX", "hypha")

WORKERS = f"{PREFIX}:workers"

INDEX_FREE = {
    "memory": f"{PREFIX}:index:free_memory",
    "core_milli": f"{PREFIX}:index:free_core_milli",
    "whole_cores": f"{PREFIX}:index:free_whole_cores",
    "gpus": f"{PREFIX}:index:free_gpus",
    "gpu_memory": f"{PREFIX}:index:free_gpu_memory",
}
INDEX_CAPACITY = {
    "memory": f"{PREFIX}:index:cap_memory",
    "cores": f"{PREFIX}:index:cap_cores",
    "gpus": f"{PREFIX}:index:cap_gpus",
    "gpu_memory": f"{PREFIX}:index:cap_gpu_memory",
}


def worker(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def worker_queue(worker_id: str) -> str:
    """The queue only ``worker_id`` consumes (not a Redis key: a broker queue name)."""
    return f"hypha.worker.{worker_id}"


def node_workers(node: str) -> str:
    return f"{PREFIX}:node:{node}:workers"


def node_capacity(node: str) -> str:
    return f"{PREFIX}:node:{node}:capacity"


def node_used(node: str) -> str:
    return f"{PREFIX}:node:{node}:used"


def leases(node: str) -> str:
    return f"{PREFIX}:node:{node}:leases"


def lease_data(node: str) -> str:
    return f"{PREFIX}:node:{node}:lease_data"


def task_guard(task_id: str) -> str:
    return f"{PREFIX}:task:{task_id}:lease"


def nonce(key_id: str, value: str) -> str:
    return f"{PREFIX}:nonce:{key_id}:{value}"
