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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from hypha_celery import errors, lua
from hypha_celery.keys import KeySchema
from hypha_celery.redis_errors import redis_errors
from hypha_celery.resources.requirements import Requirements
from hypha_celery.units import format_size

__all__ = ["Call", "Capacity", "KvBudget", "Lease", "LeaseKeeper", "Ledger", "Refusal", "Usage"]

log = logging.getLogger(__name__)

_UNREACHABLE = "ledger Redis unreachable"
_SCRIPTS = ("set_capacity", "reserve", "release", "renew", "retake", "account", "usage")


def _pairs(flat: Any) -> dict[int, int]:
    """Lua returns ``[id, amount, id, amount]`` (or ``{}`` when empty)."""
    if not flat:
        return {}
    return {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _flat(pairs: dict[int, int]) -> list[int]:
    return [value for key, amount in sorted(pairs.items()) for value in (key, amount)]


def _spread(milli: int, cores: list[int]) -> dict[int, int]:
    """A fraction's thousandths over its affinity, so the amounts still add up to what it holds."""
    base, extra = divmod(milli, len(cores))
    return {core: base + (1 if i < extra else 0) for i, core in enumerate(sorted(cores))}


@dataclass(frozen=True)
class Call:
    """One ledger script call, ready to run alone or to ride in another script call to the same server.

    A result store that shares the ledger's Redis server runs it in the same script as its own write
    (:func:`hypha_celery.lua.composed`, :mod:`hypha_celery.worker.backend`), so the call costs no round
    trip of its own.
    """

    script: lua.Script
    keys: list[str]
    args: list[Any]


@dataclass(frozen=True)
class Capacity:
    """What a node offers: OS core ids, memory bytes, GPU index -> memory bytes.

    ``kv_budget``: the bytes of KV cache each device (the CPU, each GPU) admits; 0 is "auto": the
    device's memory less what the model caches hold on it and a tenth of it as headroom.
    """

    cores: list[int]
    memory: int
    gpus: dict[int, int] = field(default_factory=dict)
    gpu_sharing: bool = False
    kv_budget: int = 0


@dataclass(frozen=True)
class Lease:
    """A granted reservation. ``cores`` and ``gpus`` map a device to what is held on it.

    CPU follows Kubernetes' static CPU manager: a whole-core request holds its cores alone
    (1000 each); a fraction holds ``cpu_shared`` thousandths of the pool of cores nobody holds
    alone, and ``cores`` is then that pool as it was at admission (the task's affinity), the
    thousandths spread over it. ``holder`` and ``cache`` let a lost lease be taken back as it was.
    """

    id: str
    node: str
    memory: int
    cores: dict[int, int]
    gpus: dict[int, int]
    exclusive_gpu: bool
    task_id: str | None = None
    cpu_shared: int = 0
    holder: str = ""
    cache: bool = False
    kv: int = 0  # KV-cache bytes held against the budget of each device in ``kv_devices`` ("cpu" or a GPU index)
    kv_devices: tuple[str, ...] = ()

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
class KvBudget:
    """One device's KV budget now, what its leases hold of it, and which tasks hold it."""

    budget: int
    used: int
    holders: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget, "used": self.used, "free": self.budget - self.used, "holders": self.holders}


@dataclass(frozen=True)
class Usage:
    """A snapshot of a node's ledger after expired leases were reaped.

    ``core_milli_used``: cores held alone (1000 each; more after a forced re-take, see
    :meth:`Ledger.retake`); ``shared_milli_used``: thousandths the fractions hold in the shared pool.
    """

    capacity: Capacity | None
    memory_used: int
    core_milli_used: dict[int, int]
    gpu_memory_used: dict[int, int]
    gpu_holders: dict[int, int]
    leases: list[dict[str, Any]]
    shared_milli_used: int = 0
    kv: dict[str, KvBudget] = field(default_factory=dict)  # device ("cpu", "0", ...) -> its KV budget

    @property
    def memory_free(self) -> int:
        return (self.capacity.memory if self.capacity else 0) - self.memory_used

    @property
    def cores_used(self) -> float:
        return (sum(self.core_milli_used.values()) + self.shared_milli_used) / 1000

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
            "kv": {device: budget.to_json() for device, budget in self.kv.items()},
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

    def _call(self, name: str, args: list[Any], extra_keys: Iterable[str] = ()) -> Call:
        return Call(lua.script(name, prelude=True), [*self._keys, *extra_keys], [self.node, *args])

    def _run(self, name: str, args: list[Any], extra_keys: Iterable[str] = ()) -> Any:
        call = self._call(name, args, extra_keys)
        with redis_errors(_UNREACHABLE):
            return call.script(self.redis, call.keys, call.args)

    def _guards(self, leases: Iterable[Lease]) -> list[str]:
        return [self.schema.task_guard(lease.task_id) if lease.task_id else self._no_guard for lease in leases]

    def set_capacity(self, capacity: Capacity) -> None:
        """Publish what this node offers; existing leases are kept."""
        spec = {
            "memory": capacity.memory,
            "cores": sorted(capacity.cores),
            "gpus": [[gpu, amount] for gpu, amount in sorted(capacity.gpus.items())],
            "sharing": 1 if capacity.gpu_sharing else 0,
            "kv": capacity.kv_budget,
        }
        self._run("set_capacity", [json.dumps(spec)], self.schema.index_capacity().values())

    def try_reserve(
        self,
        req: Requirements,
        *,
        holder: str,
        task_id: str | None = None,
        ttl: float | None = None,
        via: Callable[[Call], Any] | None = None,
    ) -> Lease | Refusal:
        """Reserve or say why not: a :class:`Lease`, or a :class:`Refusal` for :meth:`refusal` to explain.

        ``via`` runs the script and returns its reply instead of this ledger's client: a call to the
        same server that does other work too (:mod:`hypha_celery.worker.backend`).
        The script is the same either way, so the reservation is the same atomic all-or-nothing step;
        sent twice with the same lease id (a lost reply), it answers with the lease it took.
        """
        lease_id = uuid.uuid4().hex
        ttl_ms = int((ttl or self.ttl) * 1000)
        guard = self.schema.task_guard(task_id) if task_id else self._no_guard
        mode = "node" if req.gpu_exclusive is None else "exclusive" if req.gpu_exclusive else "shared"
        call = self._call(
            "reserve",
            [lease_id, ttl_ms, req.memory, req.cpu_milli, req.gpus, req.gpu_memory, holder, task_id or "", req.kv,
             mode],
            [guard],
        )
        with redis_errors(_UNREACHABLE):
            raw = via(call) if via is not None else call.script(self.redis, call.keys, call.args)
        answer = json.loads(raw)
        if not answer["ok"]:
            return Refusal(
                why=answer["why"],
                resource=answer.get("resource", ""),
                lease=answer.get("lease", ""),
                holder=answer.get("holder", ""),
            )
        shared, affinity = int(answer["s"]), [int(core) for core in answer["a"] or []]
        return Lease(
            id=lease_id,
            node=self.node,
            memory=int(answer["m"]),
            cores=_spread(shared, affinity) if shared else _pairs(answer["c"]),
            gpus=_pairs(answer["g"]),
            exclusive_gpu=bool(answer["x"]),
            task_id=task_id,
            cpu_shared=shared,
            holder=holder,
            kv=int(answer.get("kv") or 0),
            kv_devices=tuple(str(device) for device in answer.get("kd") or []),
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
        if why == "busy" and resource == "kv":
            return errors.ResourcesBusy(f"node {self.node}'s KV budget is full now for {req.describe()}")
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

    def release_call(self, *leases: Lease) -> Call:
        """:meth:`release` as a :class:`Call`, to run with another call to this ledger's server (its reply: the count)."""
        return self._call("release", [lease.id for lease in leases], self._guards(leases))

    def renew(self, leases: Iterable[Lease], ttl: float | None = None) -> set[str]:
        """Extend leases; returns the ids that were already lost (expired or released)."""
        leases = list(leases)
        if not leases:
            return set()
        ttl_ms = int((ttl or self.ttl) * 1000)
        lost = self._run("renew", [ttl_ms, *(lease.id for lease in leases)], self._guards(leases))
        return {item.decode() if isinstance(item, bytes) else str(item) for item in lost}

    def retake(self, leases: Iterable[Lease], ttl: float | None = None) -> dict[str, list[str]]:
        """Renew leases this process still holds, and take back any that were lost, as they were.

        A lease is lost when the ledger reaped it: its Redis was unreachable for longer than the
        TTL, or its holder stalled past it. The holder still runs, on the cores it was pinned to, so
        the lease comes back with the same id, cores and GPUs even where another lease took them
        meanwhile: the ledger then over-commits, as the node really does, and admission refuses
        until the usage drops. Returns each lease taken back with what it over-commits (``[]``: nothing).
        """
        leases = list(leases)
        if not leases:
            return {}
        held = [
            {
                "id": lease.id,
                "m": lease.memory,
                "c": [] if lease.cpu_shared else _flat(lease.cores),
                "s": lease.cpu_shared,
                "a": sorted(lease.cores) if lease.cpu_shared else [],
                "g": _flat(lease.gpus),
                "x": 1 if lease.exclusive_gpu else 0,
                "h": lease.holder,
                "t": lease.task_id or "",
                "k": "cache" if lease.cache else "task",
                "kv": lease.kv,
                "kd": list(lease.kv_devices),
            }
            for lease in leases
        ]
        ttl_ms = int((ttl or self.ttl) * 1000)
        answer = json.loads(self._run("retake", [ttl_ms, json.dumps(held)], self._guards(leases)))
        retaken = answer["retaken"] if isinstance(answer["retaken"], dict) else {}
        return {lease_id: list(clash or []) for lease_id, clash in retaken.items()}

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
        leases = list(data["leases"]) if isinstance(data["leases"], list) else []
        budgets = data.get("kv") if isinstance(data.get("kv"), dict) else {}
        return Usage(
            capacity=_capacity_from_hash(data["capacity"]) if data["capacity"] else None,
            memory_used=int(used.get("memory", 0)),
            core_milli_used={int(k[1:]): int(v) for k, v in used.items() if k.startswith("c") and int(v)},
            gpu_memory_used=_gpu_used(used),
            gpu_holders={int(k[2:]): int(v) for k, v in used.items() if k.startswith("gh") and int(v)},
            leases=leases,
            shared_milli_used=int(used.get("shared", 0)),
            kv={device: KvBudget(int(budget), int(used.get(f"kv{device}", 0)), _kv_holders(leases, device))
                for device, budget in sorted(budgets.items())},
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


def _kv_holders(leases: list[dict[str, Any]], device: str) -> list[str]:
    """The tasks (or holders, for a lease without one) whose KV cache counts against ``device``'s budget."""
    return sorted(lease.get("t") or lease.get("h") or lease.get("id", "") for lease in leases
                  if lease.get("kv") and device in (lease.get("kd") or []))


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
        kv_budget=int(spec.get("kv") or 0),
    )


class LeaseKeeper:
    """Renews every lease a process holds, in one Redis call per heartbeat, and releases them.

    ``release(lease)`` hands a lease back off the caller's critical path: the
    keeper's thread returns every lease released since its last wake-up in one
    call, moments later. A lease whose release never happens (the process died)
    expires by itself.

    A lease that comes back lost from a renewal (the ledger's Redis was
    unreachable for longer than the TTL, or the holder stalled past it) is still
    in use, so the keeper takes it back at once, as it was (:meth:`Ledger.retake`),
    and logs that once. After a renewal that found Redis unreachable, the keeper
    tries again every ``_RETRY_S`` and its first call that gets through renews and
    takes back in one step, so nothing is admitted in between by this ledger's
    view of an empty node. ``lost(lease)`` tells a holder that somebody else held
    some of its resources when it was taken back (the node over-committed).
    """

    _RETRY_S = 0.25  # after an unanswered renewal: how soon to try again (a lost lease is taken back then)

    def __init__(self, ledger: Ledger, interval: float | None = None) -> None:
        self.ledger = ledger
        self.interval = interval if interval is not None else ledger.ttl / 2
        self._leases: dict[str, Lease] = {}
        self._releasing: list[Lease] = []
        self._lost: set[str] = set()
        self._unreachable = False  # the last renewal failed: the next one takes back whatever was lost
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
        """Whether ``lease`` was lost and, when taken back, found some of its resources held by others."""
        with self._guard:
            return lease.id in self._lost

    def renew_now(self) -> None:
        """Renew every held lease and take back the lost ones; raises ``RegistryUnavailable`` when Redis is down."""
        with self._guard:
            leases = list(self._leases.values())
            unreachable = self._unreachable
        if not leases:
            return
        try:
            if unreachable:  # the ledger may have reaped any of them meanwhile: one call renews or takes back
                retaken = self.ledger.retake(leases)
            else:
                lost = self.ledger.renew(leases)
                with self._guard:
                    still_held = [lease for lease in leases if lease.id in lost and lease.id in self._leases]
                retaken = self.ledger.retake(still_held) if still_held else {}
        except errors.RegistryUnavailable as exc:
            if not unreachable:
                log.warning("%s: %d lease(s) will be renewed, or taken back if lost, when it answers",
                            exc, len(leases))
            with self._guard:
                self._unreachable = True
            raise
        if unreachable:
            log.warning("ledger Redis answers again: leases renewed")
        self._settle(leases, retaken)

    def _settle(self, leases: list[Lease], retaken: dict[str, list[str]]) -> None:
        """Log what was taken back (once), and give back any its holder released meanwhile."""
        with self._guard:
            self._unreachable = False
            gone = [lease for lease in leases if lease.id in retaken and lease.id not in self._leases]
            self._lost |= {lease_id for lease_id, clash in retaken.items() if clash and lease_id in self._leases}
        if retaken:
            log.warning("took back %d lease(s) lost before renewal (ledger outage, or holder stalled past the TTL): %s",
                        len(retaken), ", ".join(sorted(retaken)))
        for lease_id, clash in sorted(retaken.items()):
            if clash:
                log.warning("lease %s, taken back, over-commits the node (%s): admission waits until it drops",
                            lease_id, ", ".join(clash))
        if gone:  # released by its holder while being taken back: give it back again
            self.ledger.release(*gone)

    def _loop(self) -> None:
        next_renewal = time.monotonic() + self.interval
        while True:
            self._wake.wait(max(0.0, next_renewal - time.monotonic()))
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # unreleased leases expire by themselves
                log.warning("lease keeper: could not release leases (they expire by themselves): %s", exc)
            if time.monotonic() < next_renewal:
                continue
            next_renewal = time.monotonic() + self.interval
            with self._guard:
                if not self._leases and not self._releasing:
                    self._thread = None
                    return
            try:
                self.renew_now()
            except errors.RegistryUnavailable:  # logged once by renew_now; try again soon
                next_renewal = time.monotonic() + min(self.interval, self._RETRY_S)
            except Exception as exc:  # keep going through anything else; a lease not renewed expires
                log.warning("lease keeper: %s", exc)
