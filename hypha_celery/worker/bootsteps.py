"""Worker bootsteps: the node (ledger capacity, metrics, monitor) and the registry.

``NodeStep`` lives in the worker blueprint: it publishes this node's capacity
to the ledger before the consumer starts taking tasks, starts each device's
serving executor and loads ``[worker.models] preload`` (so the worker reports
``ready`` only once the first request would be warm), serves metrics, and
refreshes resource gauges every ``monitor_interval`` on the worker's timer
(restarting a serving executor that died while idle).

``RegistryStep`` lives in the consumer blueprint, after the task consumer
started: it registers the worker's capabilities, refreshes them every
``advertisement_interval`` on the worker's timer, and removes the record on
a clean shutdown. A Redis outage at a refresh is logged and the worker keeps
serving; the next refresh after Redis returns registers it again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import psutil
from celery import bootsteps, signals

from hypha_celery import keys, registry
from hypha_celery.config import WorkerConfig, load_config
from hypha_celery.errors import HyphaError
from hypha_celery.manifest import expected_size
from hypha_celery.monitoring.metrics import Metrics, PrometheusMetrics, prepare_multiprocess_dir
from hypha_celery.monitoring.tracing import from_env as tracing_from_env
from hypha_celery.resources.capabilities import detect_capabilities, node_capacity
from hypha_celery.resources.gpu import gpu_utilization
from hypha_celery.security import load_identity, peer_id
from hypha_celery.worker.context import NodeContext

__all__ = ["NodeStep", "RegistryStep"]

log = logging.getLogger(__name__)


class NodeStep(bootsteps.StartStopStep):
    """Builds the node context and hands it to the tasks; capacity in the ledger, metrics, the resource monitor."""

    label = "hypha node"
    requires = ("celery.worker.components:Timer",)

    def __init__(
        self,
        w: Any,
        hypha_config: WorkerConfig | None = None,
        hypha_metrics_port: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(w, **kwargs)
        # The eager --hypha-config option leaves the loaded config here; a WorkController built
        # in code (no CLI) reads $HYPHA_CONFIG like the option would.
        self.config = hypha_config if isinstance(hypha_config, WorkerConfig) else load_config()
        self.metrics_port = hypha_metrics_port or self.config.monitoring.metrics_port
        metrics = Metrics()
        if self.config.monitoring.collect_metrics:  # before any pool process is forked
            metrics = PrometheusMetrics(*prepare_multiprocess_dir())
        security = self.config.security
        # The worker's identity, read (or made, once) here so every pool process signs with the same key.
        identity = load_identity(security.identity_key, self.config.models.model_dir) if security.sign_results else None
        backend = w.app.conf.result_backend
        # OTel's global provider and the Celery instrumentation, before any pool process is forked (OTel's batch
        # exporter restarts its thread in a forked child); off, and nothing imported, unless OTEL_* asks.
        tracing = tracing_from_env("hypha-worker", worker=True)
        self.context = NodeContext.build(self.config, metrics, identity,
                                         results_url=backend if isinstance(backend, str) else None, tracing=tracing)
        if identity is not None:
            log.info("results signed by this worker's identity %s", peer_id(identity.verify_key))
        self.app = w.app
        w.hypha = self.context
        self.timer_ref: Any = None
        self.http: Any = None
        self.capacity_published = False
        # A prefork pool process gets a context of its own (never the parent's connections or threads).
        signals.worker_process_init.connect(self._child_started, weak=False)
        signals.worker_process_shutdown.connect(self._child_exiting, weak=False)

    def _child_started(self, **_: Any) -> None:
        self.context = self.context.for_child()
        bind_tasks(self.app, self.context)

    def _child_exiting(self, **_: Any) -> None:
        self.context.metrics.process_exited(os.getpid())

    def start(self, w: Any) -> None:
        ctx = self.context
        bind_tasks(w.app, ctx)
        if self.config.monitoring.collect_metrics:
            self.http = ctx.metrics.serve(self.metrics_port)
            log.info("hypha metrics on :%d", self.metrics_port)
        self._publish_capacity()
        if self.config.execution.prewarm:
            self._prewarm(w)
        self.timer_ref = w.timer.call_repeatedly(self.config.monitoring.monitor_interval, self._monitor)

    def _prewarm(self, w: Any) -> None:
        """Start the serving executors (torch imported) and load the preload models, before tasks arrive."""
        if "prefork" in str(getattr(w, "pool_cls", "")).lower():
            log.info("prewarm skipped: under --pool prefork each pool process starts its own executors on first use")
            return
        ctx = self.context
        started = time.monotonic()
        gpus = sorted(node_capacity(ctx.config).gpus)
        devices = ["cpu", *(f"cuda:{index}" for index in gpus)]
        targets = set(devices[1:] or devices)  # preload onto every GPU, else the CPU
        loaded: dict[str, float] = {}
        for device in devices:
            preload = []
            if device in targets:
                for model in ctx.config.models.preload:
                    try:
                        preload.append((model, expected_size(ctx.store.manifest(model), device)))
                    except HyphaError as exc:
                        log.error("[worker.models] preload: %s: %s", model, exc)
            try:
                for model, load_s in ctx.executors.prewarm(device, preload).items():
                    loaded[f"{model} on {device}"] = load_s
            except HyphaError as exc:
                log.error("could not start the %s serving executor at boot (the first request will): %s", device, exc)
        log.info("serving executors ready in %.2fs (%s)%s", time.monotonic() - started, ", ".join(devices),
                 "; preloaded " + ", ".join(f"{k} ({v:.2f}s)" for k, v in loaded.items()) if loaded else "")

    def _publish_capacity(self) -> None:
        ctx = self.context
        try:
            ctx.ledger.set_capacity(node_capacity(ctx.config))
            self.capacity_published = True
        except HyphaError as exc:
            self.capacity_published = False
            log.warning("cannot publish node capacity yet (%s); retrying every monitor_interval", exc)

    def _monitor(self) -> None:
        ctx = self.context
        try:
            # Redis restarted empty, or placement dropped the node while it was unadvertised
            if not self.capacity_published or ctx.ledger.capacity() is None or not ctx.ledger.indexed():
                self._publish_capacity()
            usage = ctx.ledger.usage()
        except HyphaError as exc:
            self.capacity_published = False
            log.warning("resource monitor: %s", exc)
            return
        if self.config.execution.prewarm:
            ctx.executors.keep_warm()
        memory = psutil.virtual_memory()
        ctx.metrics.update_resources(usage, psutil.cpu_percent() / 100.0, memory.percent / 100.0, gpu_utilization())

    def stop(self, w: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None
        self.context.close()
        self.context.tracing.close()
        if self.http is not None:
            server, _thread = self.http
            server.shutdown()
            self.http = None
        self.context.metrics.close()

    shutdown = stop


def bind_tasks(app: Any, ctx: NodeContext) -> None:
    """Hand the node context to every hypha task of ``app`` (Celery's custom-base-class pattern).

    The tasks import the worker's parts, not the other way round: a task class says it takes the context with
    ``takes_node_context`` (``HyphaTask`` does).
    """
    for task in app.tasks.values():
        if getattr(type(task), "takes_node_context", False):
            task.node = ctx


class RegistryStep(bootsteps.StartStopStep):
    """This worker's record in ``hypha:worker:<id>``, refreshed on the worker's timer."""

    label = "hypha registry"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, without_hypha_registry: bool = False, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.enabled = not without_hypha_registry
        self.timer_ref: Any = None
        self.record: registry.WorkerRecord | None = None
        self.context: NodeContext  # the worker's, from NodeStep, at start
        self.healthy = True
        self._bases: dict[str, str | None] = {}  # model id -> its base's id (an adapter) or None
        self.published = registry.Published()  # what the model indexes hold for us: a refresh sends changes only
        c.hypha_registry = None

    def start(self, c: Any) -> None:
        ctx = self.context = c.controller.hypha
        cfg = ctx.config
        self.record = registry.WorkerRecord(
            worker_id=c.hostname,
            node_id=ctx.node_id,
            queue=keys.worker_queue(c.hostname),
            max_memory_per_task=cfg.max_memory_per_task,
            max_cpu_cores_per_task=cfg.max_cpu_cores_per_task,
            gpu_sharing=cfg.execution.gpu_sharing,
            verify_task_signatures=cfg.security.verify_task_signatures,
            started_at=time.time(),
            peer_id=None if ctx.identity is None else peer_id(ctx.identity.verify_key),
        )
        c.hypha_registry = self
        self.refresh()
        if self.timer_ref is None:
            self.timer_ref = c.timer.call_repeatedly(cfg.network.advertisement_interval, self.refresh)

    def capabilities(self) -> dict[str, Any]:
        ctx = self.context
        caps = detect_capabilities(ctx.config, ctx.store.list(), ctx.inference_times.snapshot(),
                                   capacity=node_capacity(ctx.config))
        return caps.to_json()

    def _adapters(self, models: list[str]) -> dict[str, str]:
        """Adapter id -> base id among ``models``; ids are immutable, so each manifest is read once."""
        for model in models:
            if model not in self._bases:
                try:
                    adapter_of = self.context.store.peek(model).adapter_of
                except HyphaError:
                    continue  # a broken entry: advertised by id, never placed on as an adapter
                self._bases[model] = adapter_of.id if adapter_of is not None else None
        return {model: base for model in models if (base := self._bases.get(model)) is not None}

    def refresh(self) -> None:
        if self.record is None:
            return
        ctx = self.context
        cfg = ctx.config
        try:
            caps = detect_capabilities(cfg, ctx.store.list(), capacity=node_capacity(cfg))
            usage = ctx.ledger.usage()
            loaded = sorted({model for lane in ctx.executors.cache().values() for model in lane})
            registry.register(ctx.redis, self.record, caps, usage, ttl=3 * cfg.network.advertisement_interval,
                              extra={**ctx.metrics.cache_totals(), "shared_storage": int(ctx.shared_storage is not None)},
                              adapters=self._adapters(caps.models), loaded=loaded,
                              published=self.published)
            ctx.inference_times.flush(ctx.redis, self.record.worker_id, force=True)
        except HyphaError as exc:
            if self.healthy:
                log.warning("registry refresh failed (%s); still serving, retrying every %ss",
                            exc, cfg.network.advertisement_interval)
            self.healthy = False
            return
        if not self.healthy:
            log.warning("registry reachable again: %s re-registered", self.record.worker_id)
        self.healthy = True

    def stop(self, c: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self.record is not None:
            try:
                registry.deregister(self.context.redis, self.record.worker_id, self.record.node_id)
                self.published.forget()
                log.info("%s removed from the registry", self.record.worker_id)
            except HyphaError as exc:
                log.warning("could not remove %s from the registry: %s", self.record.worker_id, exc)
