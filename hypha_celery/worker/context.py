"""What one worker process holds: config, Redis, ledger, lease keeper, placement, store, executors, metrics, identity.

:class:`~hypha_celery.worker.bootsteps.NodeStep` builds a :class:`NodeContext`
when the worker starts and hands it to every hypha task (their base class,
:class:`~hypha_celery.tasks.base.HyphaTask`, carries it). A prefork pool
process gets a context of its own right after the fork (:meth:`NodeContext.for_child`):
Redis connections, the lease keeper's thread and executor processes are never
shared across a fork. Everything here is built up front; nothing is created on
first use, so there is nothing to lock (one exception, which locks itself: a
Redis Cluster client asks for the slot map on first use,
:class:`~hypha_celery.redis_client.LazyCluster`).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

import nacl.signing
import redis

from hypha_celery.config import WorkerConfig, registry_url, result_backend_url
from hypha_celery.config.schema import ModelSource
from hypha_celery.errors import HyphaError, InvalidTask
from hypha_celery.executor.limits import NICE
from hypha_celery.executor.pool import ExecutorPool
from hypha_celery.executor.process import ExecutorSettings
from hypha_celery.models.shared_storage import SharedStorage, models_source, open_storage
from hypha_celery.models.store import ModelStore
from hypha_celery.monitoring.metrics import Metrics
from hypha_celery.monitoring.tracing import Tracing
from hypha_celery.redis_client import registry_client
from hypha_celery.registry import InferenceTimes
from hypha_celery.resources.gpu import CUDA_CONTEXT
from hypha_celery.resources.ledger import Lease, LeaseKeeper, Ledger
from hypha_celery.resources.placement import Placement
from hypha_celery.security import Verifier, peer_id, replay_window
from hypha_celery.token_stream import TokenStreams

__all__ = ["NodeContext", "node_id"]

log = logging.getLogger(__name__)


def _sources(cfg: WorkerConfig) -> list[ModelSource]:
    """The model sources, then DiLoCo's shared storage (its global model versions, read like any source)."""
    shared = cfg.training.shared_storage
    return [*cfg.models.sources, *([] if shared is None else [models_source(shared)])]


def node_id(cfg: WorkerConfig) -> str:
    """The ledger this worker shares: ``[worker.resources] node_id``, else the host name."""
    return cfg.resources.node_id or socket.gethostname()


@dataclass
class NodeContext:
    """The collaborators of one worker process; build with :meth:`build`, end with :meth:`close`."""

    config: WorkerConfig
    metrics: Metrics
    node_id: str
    redis: redis.Redis
    ledger: Ledger
    keeper: LeaseKeeper
    placement: Placement
    store: ModelStore
    verifier: Verifier
    inference_times: InferenceTimes
    shared_storage: SharedStorage | None = None
    identity: nacl.signing.SigningKey | None = None  # signs results (sign_results); loaded once by NodeStep
    results_url: str | None = None  # the result backend the app stores results in (None: the config's)
    token_streams: TokenStreams | None = None  # generations' token streams, on the result backend's Redis
    tracing: Tracing = field(default_factory=Tracing)  # the stages' spans (off unless OTEL_* asks: NodeStep)
    executors: ExecutorPool = field(init=False)
    closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.executors = ExecutorPool(executor_settings(self.config), on_cache_change=self._account_cache)

    @classmethod
    def build(
        cls, config: WorkerConfig, metrics: Metrics | None = None, identity: nacl.signing.SigningKey | None = None,
        results_url: str | None = None, tracing: Tracing | None = None,
    ) -> NodeContext:
        """Every collaborator of a worker process; opens no connection and starts no process yet.

        ``identity``: the worker's key that signs results (:func:`hypha_celery.security.load_identity`);
        ``results_url``: the app's result backend (where token streams go; default: the config's);
        ``tracing``: where the stages' spans go (:func:`hypha_celery.monitoring.tracing.from_env`; default: off).
        """
        client = registry_client(registry_url(config), timeout=5, health_check_interval=30)
        node = node_id(config)
        ledger = Ledger(client, node, ttl=2 * config.resources.lease_heartbeat)
        security = config.security
        remember = replay_window(config) - security.max_envelope_age  # how long copies may come back
        return cls(
            config=config,
            metrics=metrics or Metrics(),
            node_id=node,
            redis=client,
            ledger=ledger,
            keeper=LeaseKeeper(ledger, interval=config.resources.lease_heartbeat),
            placement=Placement(client),
            store=ModelStore.from_config(config.models, sources=_sources(config)),
            verifier=Verifier(security.allowed_schedulers, client, max_age=security.max_envelope_age,
                              remember_s=remember),
            inference_times=InferenceTimes(),
            shared_storage=None if config.training.shared_storage is None else open_storage(config.training.shared_storage),
            identity=identity,
            results_url=results_url,
            token_streams=token_streams(results_url or result_backend_url(config), config, identity),
            tracing=tracing or Tracing(),
        )

    def storage(self) -> SharedStorage:
        """DiLoCo's shared storage (``[worker.training] shared_storage``); a worker without one takes no rounds."""
        if self.shared_storage is None:
            raise InvalidTask("DiLoCo tasks need [worker.training] shared_storage, which this worker does not have")
        return self.shared_storage

    def holds(self, model: str, gpu: bool) -> bool:
        """Whether the serving executor a one-device request would land on already holds ``model``."""
        if not gpu:
            return self.executors.holds(model, gpu=False)
        capacity = self.ledger.capacity()
        return capacity is not None and self.executors.holds(model, gpu=True, gpu_count=len(capacity.gpus))

    def for_child(self) -> NodeContext:
        """A fresh context for a forked pool process: same config and metrics, its own everything else."""
        return NodeContext.build(self.config, self.metrics, self.identity, self.results_url, self.tracing)

    def close(self) -> None:
        """Stop executors, hand back leases released moments ago (not at their expiry), drop connections."""
        if self.closed:
            return
        self.closed = True
        self.executors.close()
        try:
            self.keeper.flush()
        except HyphaError as exc:
            log.warning("could not release leases at shutdown (they expire by themselves): %s", exc)
        self.redis.close()
        if self.token_streams is not None:
            self.token_streams.close()

    def _account_cache(self, device: str, size: int, evicted: int = 0) -> None:
        """A serving executor's cache changed: its bytes count as taken in the ledger.

        The account is a lease like any other, renewed by this process's
        LeaseKeeper, so a dead worker's cache stops counting by itself, and one
        lost in a ledger outage is accounted again when the ledger answers.
        """
        # A GPU executor's CUDA context lives as long as its cache does: counted with it.
        gpus = {int(device.split(":")[1].split(",")[0]): size + CUDA_CONTEXT if size else 0} \
            if device.startswith("cuda:") else {}
        account = Lease(
            id=f"cache:{self.node_id}:{os.getpid()}:{device}",
            node=self.node_id,
            memory=0 if gpus else size,
            cores={},
            gpus=gpus,
            exclusive_gpu=False,
            holder=f"model cache on {device}",
            cache=True,  # lost in a ledger outage, the keeper accounts it again (Ledger.retake)
        )
        self.ledger.account(account.id, memory=account.memory, gpus=gpus, holder=account.holder)
        self.metrics.cache_changed(device, size, evicted)
        if size:
            self.keeper.add(account)
        else:
            self.keeper.discard(account)


def token_streams(url: str, cfg: WorkerConfig, identity: nacl.signing.SigningKey | None = None) -> TokenStreams | None:
    """Token streams on the result backend at ``url`` when it is a Redis (None for any other backend), their entries
    signed by ``identity`` when the worker has one."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)
    return TokenStreams(client, maxlen=cfg.generation.stream_maxlen, identity=identity,
                        peer="" if identity is None else peer_id(identity.verify_key))


def executor_settings(cfg: WorkerConfig) -> ExecutorSettings:
    """How this worker's executor processes run, from its config."""
    return ExecutorSettings(
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
        max_text_bytes=cfg.security.max_text_bytes,
        generation_batching=cfg.generation.batching,
        prefix_cache_bytes=cfg.generation.prefix_cache,
    )
