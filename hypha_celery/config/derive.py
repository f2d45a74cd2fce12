"""The Celery settings a worker config implies: broker, result backend, registry, limits."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hypha_celery.config.schema import DEFAULT_BROKER_URL, WorkerConfig

__all__ = ["broker_urls", "celery_settings", "registry_url", "result_backend_url"]


def broker_urls(cfg: WorkerConfig, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Broker URLs in failover order: ``$HYPHA_BROKER_URL``, else ``gateway_addresses``."""
    env = environ.get("HYPHA_BROKER_URL")
    if env:
        return [u for u in env.split(";") if u]
    return list(cfg.network.gateway_addresses) or [DEFAULT_BROKER_URL]


def result_backend_url(cfg: WorkerConfig, environ: Mapping[str, str] = os.environ) -> str:
    """``$HYPHA_RESULT_BACKEND``, the config's, else the first Redis broker, else the default."""
    env = environ.get("HYPHA_RESULT_BACKEND")
    if env:
        return env
    if cfg.network.result_backend:
        return cfg.network.result_backend
    for url in broker_urls(cfg, environ):
        if url.startswith(("redis://", "rediss://", "unix://")):
            return url
    return DEFAULT_BROKER_URL


def registry_url(cfg: WorkerConfig, environ: Mapping[str, str] = os.environ) -> str:
    """Where the registry and ledger live: ``$HYPHA_REGISTRY_URL``, config, else the result backend."""
    env = environ.get("HYPHA_REGISTRY_URL")
    if env:
        return env
    if cfg.network.registry_url:
        return cfg.network.registry_url
    backend = result_backend_url(cfg, environ)
    if backend.startswith(("redis://", "rediss://", "unix://")):
        return backend
    return DEFAULT_BROKER_URL


def celery_settings(cfg: WorkerConfig, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The Celery settings this worker config implies (see :mod:`hypha_celery.config.settings` for why)."""
    urls = broker_urls(cfg, environ)
    return {
        "broker_url": urls if len(urls) > 1 else urls[0],
        "result_backend": result_backend_url(cfg, environ),
        "task_soft_time_limit": cfg.soft_time_limit,
        "task_time_limit": cfg.hard_time_limit,
        "worker_concurrency": cfg.max_concurrent_tasks,
        "task_default_queue_type": cfg.network.shared_queue_type,
        "broker_transport_options": {
            "visibility_timeout": cfg.visibility_timeout,
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
        },
        "result_backend_transport_options": {"visibility_timeout": cfg.visibility_timeout},
    }
