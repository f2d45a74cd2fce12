"""A node's resource ledger: atomic, all-or-nothing leases of cores, memory and GPUs.

The seed's managers check (``load``) and then add (``fetch_add``): two tasks
can pass the same check. Here a reservation is one Lua script run by Redis
(``hypha_celery/lua/reserve.lua``), so checking and taking are one step,
and every process on the node - prefork children, several workers, a
scheduler reading usage - sees the same numbers.

A reservation is a *lease*: it expires ``ttl`` seconds after its last renewal
(Redis server clock), so resources held by a process that was killed -9 come
back by themselves. :class:`LeaseKeeper` renews every live lease of a process
in one call per heartbeat.

Public API::

    ledger = Ledger(redis_client, node_id="gpu-host-1")
    ledger.set_capacity(Capacity(cores=[0, 1, 2, 3], memory=16 * 2**30, gpus={0: 80 * 10**9}))
    lease = ledger.reserve(Requirements.parse({"memory": "2GB", "gpus": 1}), holder="me")
    ledger.renew([lease])
    ledger.release(lease)
    ledger.usage()
    with ledger.hold(requirements, holder="task-1") as lease: ...   # renewed while inside

Redis keys: :class:`hypha_celery.keys.KeySchema` (``$HYPHA_KEY_PREFIX`` is read
when a ``Ledger`` is built, unless it is given a schema).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from hypha_celery import errors, lua
from hypha_celery.keys import KeySchema
from hypha_celery.redis_errors import redis_errors
from hypha_celery.resources.requirements import Requirements
from hypha_celery.units import format_size

__all__ = ["Capacity", "Lease", "LeaseKeeper", "Ledger", "Refusal", "Usage"]

log = logging.getLogger(__name__)

_UNREACHABLE = "ledger Redis unreachable"
_SCRIPTS = ("set_capacity", "reserve", "release", "renew", "account", "usage")


def _pairs(flat: Any) -> dict[int, int]:
    """Lua returns ``[id, amount, id, amount]`` (or ``{}`` when empty)."""
    if not flat:
        return {}
    return {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


@dataclass(frozen=True)
class Capacity:
    """What a node offers: OS core ids, memory bytes, GPU index -> memory bytes."""

    cores: list[int]
    memory: int
    gpus: dict[int, int] = field(default_factory=dict)
    gpu_sharing: bool = False


@dataclass(frozen=True)
class Lease:
    """A granted reservation. ``cores`` and ``gpus`` map a device to what is held on it."""

    id: str
    node: str
    memory: int
    cores: dict[int, int]
    gpus: dict[int, int]
    exclusive_gpu: bool
    task_id: str | None = None

    @property
    def core_ids(self) -> list[int]:
        return sorted(self.cores)

    @property
    def gpu_ids(self) -> list[int]:
        return sorted(self.gpus)

    @property
    def device(self) -> str:
        """The torch device the task runs on, as the task's own process sees it."""
        return "cuda:0" if self.gpus else "cpu"

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(g) for g in self.gpu_ids)


@dataclass(frozen=True)
class Usage:
    """A snapshot of a node's ledger after expired leases were reaped."""

    capacity: Capacity | None
    memory_used: int
    core_milli_used: dict[int, int]
    gpu_memory_used: dict[int, int]
    gpu_holders: dict[int, int]
    leases: list[dict[str, Any]]

    @property
    def memory_free(self) -> int:
        return (self.capacity.memory if self.capacity else 0) - self.memory_used

    @property
    def cores_used(self) -> float:
        return sum(self.core_milli_used.values()) / 1000

    def to_json(self) -> dict[str, Any]:
        cap = self.capacity
        return {
            "capacity": None
            if cap is None
            else {"cores": cap.cores, "memory": cap.memory, "gpus": {str(k): v for k, v in cap.gpus.items()}},
            "memory_used": self.memory_used,
            "cores_used": self.cores_used,
            "gpu_memory_used": {str(k): v for k, v in self.gpu_memory_used.items()},
            "leases": len(self.leases),
        }


@dataclass(frozen=True)
class Refusal:
    """Why the ledger refused a reservation.

    ``busy``: it fits the node but not what is free now (``resource`` says which);
    ``infeasible``: it could never fit this node; ``duplicate``: ``lease`` (held by
    ``holder``, or ``"done"`` just after it finished) already runs the task id;
    ``unknown_node``: the node has published no capacity yet.
    """

    why: Literal["busy", "infeasible", "duplicate", "unknown_node"]
    resource: str = ""
    lease: str = ""
    holder: str = ""


class Ledger:
    """One node's ledger in Redis. Thread-safe; one instance per process is enough."""

    def __init__(self, client: redis.Redis, node_id: str, *, ttl: float = 10.0, schema: KeySchema | None = None) -> None:
        self.redis = client
        self.node = node_id
        self.ttl = ttl
        self.schema = schema or KeySchema.from_env()
        self._keys = list(self.schema.ledger(node_id).values())
        self._no_guard = self.schema.task_guard("-")  # fills a guard slot for a lease that runs no task

    def _run(self, name: str, args: list[Any], extra_keys: Iterable[str] = ()) -> Any:
        with redis_errors(_UNREACHABLE):
            return lua.script(name, prelude=True)(self.redis, [*self._keys, *extra_keys], [self.node, *args])

    def _guards(self, leases: Iterable[Lease]) -> list[str]:
        return [self.schema.task_guard(lease.task_id) if lease.task_id else self._no_guard for lease in leases]

    def set_capacity(self, capacity: Capacity) -> None:
        """Publish what this node offers; existing leases are kept."""
        spec = {
            "memory": capacity.memory,
            "cores": sorted(capacity.cores),
            "gpus": [[gpu, amount] for gpu, amount in sorted(capacity.gpus.items())],
            "sharing": 1 if capacity.gpu_sharing else 0,
        }
        self._run("set_capacity", [json.dumps(spec)], self.schema.index_capacity().values())

    def try_reserve(
        self, req: Requirements, *, holder: str, task_id: str | None = None, ttl: float | None = None
    ) -> Lease | Refusal:
        """Reserve or say why not: a :class:`Lease`, or a :class:`Refusal` for :meth:`refusal` to explain."""
        lease_id = uuid.uuid4().hex
        ttl_ms = int((ttl or self.ttl) * 1000)
        guard = self.schema.task_guard(task_id) if task_id else self._no_guard
        raw = self._run(
            "reserve",
            [lease_id, ttl_ms, req.memory, req.cpu_milli, req.gpus, req.gpu_memory, holder, task_id or ""],
            [guard],
        )
        answer = json.loads(raw)
        if not answer["ok"]:
            return Refusal(
                why=answer["why"],
                resource=answer.get("resource", ""),
                lease=answer.get("lease", ""),
                holder=answer.get("holder", ""),
            )
        return Lease(
            id=lease_id,
            node=self.node,
            memory=int(answer["m"]),
            cores=_pairs(answer["c"]),
            gpus=_pairs(answer["g"]),
            exclusive_gpu=bool(answer["x"]),
            task_id=task_id,
        )

    def reserve(
        self, req: Requirements, *, holder: str, task_id: str | None = None, ttl: float | None = None
    ) -> Lease:
        """Reserve, raising ``ResourcesBusy`` (wait), an ``InsufficientCapabilities`` (never here)
        or ``DuplicateTask`` (all in :mod:`hypha_celery.errors`)."""
        result = self.try_reserve(req, holder=holder, task_id=task_id, ttl=ttl)
        if isinstance(result, Lease):
            return result
        raise self.refusal(req, result, task_id)

    def refusal(self, req: Requirements, refusal: Refusal, task_id: str | None = None) -> errors.HyphaError:
        """The exception that explains a refused reservation to a person."""
        why, resource = refusal.why, refusal.resource
        if why == "duplicate":
            return errors.DuplicateTask(task_id or "?", refusal.lease, refusal.holder)
        if why == "unknown_node":  # e.g. Redis restarted empty: the worker's monitor publishes it again
            return errors.ResourcesBusy(f"node {self.node!r} has no capacity in the ledger yet")
        if why == "busy":
            return errors.ResourcesBusy(f"node {self.node} has not enough free {resource} now for {req.describe()}")
        capacity = self.capacity()
        have = "unknown"
        if capacity is not None:
            have = f"{len(capacity.cores)} cores, {format_size(capacity.memory)} memory"
            if capacity.gpus:
                have += ", GPUs " + ", ".join(f"{i}: {format_size(m)}" for i, m in sorted(capacity.gpus.items()))
        message = f"node {self.node} can never fit {req.describe()} (short of {resource}; it has {have})"
        cls = {"cpu": errors.InsufficientCpu, "gpu": errors.InsufficientGpuMemory}.get(resource, errors.InsufficientCapabilities)
        return cls(message)

    def release(self, *leases: Lease) -> int:
        """Give leases back; idempotent. Returns how many were still held."""
        if not leases:
            return 0
        return int(self._run("release", [lease.id for lease in leases], self._guards(leases)))

    def renew(self, leases: Iterable[Lease], ttl: float | None = None) -> set[str]:
        """Extend leases; returns the ids that were already lost (expired or released)."""
        leases = list(leases)
        if not leases:
            return set()
        ttl_ms = int((ttl or self.ttl) * 1000)
        lost = self._run("renew", [ttl_ms, *(lease.id for lease in leases)], self._guards(leases))
        return {item.decode() if isinstance(item, bytes) else str(item) for item in lost}

    def account(self, lease_id: str, *, memory: int = 0, gpus: dict[int, int] | None = None, holder: str = "") -> None:
        """Record memory already in use (a model cache) under ``lease_id``, replacing its old amount."""
        flat: list[int] = []
        for gpu, amount in sorted((gpus or {}).items()):
            if amount:
                flat += [gpu, amount]
        self._run("account", [lease_id, int(self.ttl * 1000), memory, json.dumps(flat), holder])

    def usage(self) -> Usage:
        """Capacity, what is used and the live leases, after reaping the expired ones."""
        data = json.loads(self._run("usage", []))
        used = data["used"] if isinstance(data["used"], dict) else {}  # Lua's cjson writes {} and [] alike
        return Usage(
            capacity=_capacity_from_hash(data["capacity"]) if data["capacity"] else None,
            memory_used=int(used.get("memory", 0)),
            core_milli_used={int(k[1:]): int(v) for k, v in used.items() if k.startswith("c") and int(v)},
            gpu_memory_used=_gpu_used(used),
            gpu_holders={int(k[2:]): int(v) for k, v in used.items() if k.startswith("gh") and int(v)},
            leases=list(data["leases"]) if isinstance(data["leases"], list) else [],
        )

    def indexed(self) -> bool:
        """Whether placement can see this node (placement drops nodes nobody advertised for a while)."""
        with redis_errors(_UNREACHABLE):
            return self.redis.zscore(self.schema.index_capacity()["memory"], self.node) is not None

    def capacity(self) -> Capacity | None:
        """What this node published with :meth:`set_capacity`, or ``None`` before it did."""
        with redis_errors(_UNREACHABLE):
            raw: Any = self.redis.hgetall(self.schema.node_capacity(self.node))
        if not raw:
            return None
        return _capacity_from_hash({k.decode(): v.decode() for k, v in raw.items()})

    @contextmanager
    def hold(
        self, req: Requirements, *, holder: str, task_id: str | None = None, keeper: LeaseKeeper | None = None
    ) -> Iterator[Lease]:
        """Reserve, keep the lease renewed while inside, release in ``finally``.

        ``keeper`` renews it along with the process's other leases; without one, a keeper of
        its own renews it (its thread ends soon after the block does).
        """
        lease = self.reserve(req, holder=holder, task_id=task_id)
        keeper = keeper or LeaseKeeper(self)
        keeper.add(lease)
        try:
            yield lease
        finally:
            keeper.discard(lease)
            self.release(lease)


def _gpu_used(used: dict[str, Any]) -> dict[int, int]:
    """Bytes in use per GPU: tasks' reservations ("g<i>") plus model caches ("gc<i>")."""
    totals: dict[int, int] = {}
    for name, value in used.items():
        for prefix in ("gc", "g"):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                gpu = int(name[len(prefix):])
                totals[gpu] = totals.get(gpu, 0) + int(value)
                break
    return {gpu: amount for gpu, amount in totals.items() if amount}


def _capacity_from_hash(raw: dict[str, str]) -> Capacity:
    spec = json.loads(raw["spec"])
    return Capacity(
        cores=[int(c) for c in spec["cores"] or []],
        memory=int(spec["memory"]),
        gpus={int(gpu): int(amount) for gpu, amount in spec["gpus"] or []},
        gpu_sharing=spec["sharing"] == 1,
    )


class LeaseKeeper:
    """Renews every lease a process holds, in one Redis call per heartbeat, and releases them.

    ``release(lease)`` hands a lease back off the caller's critical path: the
    keeper's thread returns every lease released since its last wake-up in one
    call, moments later. A lease whose release never happens (the process died)
    expires by itself.

    A lease that comes back lost from a renewal (its holder stalled past the
    TTL and it was reaped) is logged and remembered: ``lost(lease)`` tells its
    holder that somebody else may now hold those resources.
    """

    def __init__(self, ledger: Ledger, interval: float | None = None) -> None:
        self.ledger = ledger
        self.interval = interval if interval is not None else ledger.ttl / 2
        self._leases: dict[str, Lease] = {}
        self._releasing: list[Lease] = []
        self._lost: set[str] = set()
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        """Start the keeper's thread if it is not running (guard held)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="hypha-lease-keeper", daemon=True)
            self._thread.start()

    def add(self, lease: Lease) -> None:
        with self._guard:
            self._leases[lease.id] = lease
            self._ensure_thread()

    def discard(self, lease: Lease) -> None:
        """Stop renewing ``lease`` (its holder releases it itself)."""
        with self._guard:
            self._leases.pop(lease.id, None)
            self._lost.discard(lease.id)

    def release(self, lease: Lease) -> None:
        """Stop renewing ``lease`` and give it back to the ledger from the keeper's thread."""
        with self._guard:
            self._leases.pop(lease.id, None)
            self._lost.discard(lease.id)
            self._releasing.append(lease)
            self._ensure_thread()
        self._wake.set()

    def flush(self) -> None:
        """Give back every lease waiting to be released, now (shutdown, tests)."""
        with self._guard:
            batch, self._releasing = self._releasing, []
        if batch:
            self.ledger.release(*batch)

    def lost(self, lease: Lease) -> bool:
        with self._guard:
            return lease.id in self._lost

    def renew_now(self) -> None:
        with self._guard:
            leases = list(self._leases.values())
        if not leases:
            return
        lost = self.ledger.renew(leases)
        if lost:
            log.warning("leases lost before renewal (holder stalled past the TTL?): %s", ", ".join(sorted(lost)))
            with self._guard:
                self._lost |= lost & set(self._leases)

    def _loop(self) -> None:
        next_renewal = time.monotonic() + self.interval
        while True:
            self._wake.wait(max(0.0, next_renewal - time.monotonic()))
            self._wake.clear()
            try:
                self.flush()
                if time.monotonic() >= next_renewal:
                    next_renewal = time.monotonic() + self.interval
                    with self._guard:
                        if not self._leases and not self._releasing:
                            self._thread = None
                            return
                    self.renew_now()
            except Exception as exc:  # keep going through a Redis blip; unreleased leases expire anyway
                log.warning("lease keeper: %s", exc)
