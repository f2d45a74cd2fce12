"""This process's view of the worker node: config, Redis, ledger, store, executors.

The worker loads its config once (``--hypha-config`` or ``$HYPHA_CONFIG``,
see :mod:`hypha_celery.worker.options`) and hands it to :func:`configure`.
Everything else is built lazily, once per process: a prefork child gets its
own Redis connections and executor pool after the fork, never the parent's.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from functools import cached_property

import redis

from hypha_celery.config import WorkerConfig, load_config, registry_url
from hypha_celery.executor.pool import ExecutorPool, ExecutorSettings
from hypha_celery.models.store import ModelStore
from hypha_celery.monitoring import metrics
from hypha_celery.registry import InferenceTimes
from hypha_celery.resources.ledger import Lease, LeaseKeeper, Ledger
from hypha_celery.resources.placement import Placement
from hypha_celery.security import Verifier

__all__ = ["NodeContext", "configure", "context", "current_config"]

_lock = threading.Lock()
_config: WorkerConfig | None = None
_context: NodeContext | None = None


def configure(cfg: WorkerConfig) -> None:
    """Install the worker's config for this process (and the children it forks)."""
    global _config, _context
    with _lock:
        _config, _context = cfg, None


def current_config() -> WorkerConfig:
    global _config
    with _lock:
        if _config is None:
            _config = load_config()
        return _config


def context() -> NodeContext:
    """The process-wide node context, rebuilt after a fork."""
    global _context
    cfg = current_config()
    with _lock:
        if _context is None or _context.pid != os.getpid():
            _context = NodeContext(cfg)
        return _context


_LAZY = frozenset({"redis", "ledger", "keeper", "placement", "store", "verifier", "executors", "inference_times"})


def node_id(cfg: WorkerConfig) -> str:
    return cfg.resources.node_id or socket.gethostname()


@dataclass
class NodeContext:
    """Members are built on first use, once: ``cached_property`` under one lock (it has none of its
    own since Python 3.12, and two executor pools would each start executors)."""

    config: WorkerConfig
    pid: int = field(default_factory=os.getpid)
    _building: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def __getattribute__(self, name: str) -> object:
        if name in _LAZY:
            with object.__getattribute__(self, "_building"):
                return object.__getattribute__(self, name)
        return object.__getattribute__(self, name)

    @property
    def node_id(self) -> str:
        return node_id(self.config)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(
            registry_url(self.config),
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
        )

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.redis, self.node_id, ttl=2 * self.config.resources.lease_heartbeat)

    @cached_property
    def inference_times(self) -> InferenceTimes:
        return InferenceTimes()

    @cached_property
    def keeper(self) -> LeaseKeeper:
        return LeaseKeeper(self.ledger, interval=self.config.resources.lease_heartbeat)

    @cached_property
    def placement(self) -> Placement:
        return Placement(self.redis)

    @cached_property
    def store(self) -> ModelStore:
        models = self.config.models
        return ModelStore(models.model_dir, models.sources, models.max_model_size)

    @cached_property
    def verifier(self) -> Verifier:
        security = self.config.security
        cfg = self.config
        remember = cfg.admission.max_wait + cfg.visibility_timeout + cfg.hard_time_limit
        return Verifier(security.allowed_schedulers, self.redis, max_age=security.max_envelope_age, remember_s=remember)

    @cached_property
    def executors(self) -> ExecutorPool:
        from hypha_celery.executor.limits import NICE

        cfg = self.config
        settings = ExecutorSettings(
            store=cfg.models.model_dir,
            cache_size=cfg.model_cache_size,
            max_model_size=cfg.models.max_model_size,
            sandbox=cfg.execution.sandbox_enabled,
            nice=NICE[cfg.execution.cpu_priority],
            enforce_memory=cfg.security.enforce_memory_limits,
            enforce_cpu=cfg.security.enforce_cpu_limits,
            max_batch_size=cfg.batching.max_batch_size,
            max_queue_delay_s=cfg.batching.max_queue_delay_microseconds / 1e6,
            memory_mode=os.environ.get("HYPHA_MEMORY_ENFORCEMENT") or None,
        )
        return ExecutorPool(settings, on_cache_change=self._account_cache)

    def _account_cache(self, device: str, size: int, evicted: int = 0) -> None:
        """A serving executor's cache changed: its bytes count as taken in the ledger.

        The account is a lease like any other, renewed by this process's
        LeaseKeeper, so a dead worker's cache stops counting by itself.
        """
        gpus = {int(device.split(":")[1].split(",")[0]): size} if device.startswith("cuda:") else {}
        account = Lease(
            id=f"cache:{self.node_id}:{os.getpid()}:{device}",
            node=self.node_id,
            memory=0 if gpus else size,
            cores={},
            gpus=gpus,
            exclusive_gpu=False,
        )
        self.ledger.account(account.id, memory=account.memory, gpus=gpus, holder=f"model cache on {device}")
        metrics.cache_changed(device, size, evicted)
        if size:
            self.keeper.add(account)
        else:
            self.keeper.discard(account)
