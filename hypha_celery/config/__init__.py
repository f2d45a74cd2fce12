"""The worker's TOML configuration: schema, parsing, derived Celery settings.

The file has the seed's sections (``[worker]``, ``[worker.network]``,
``[worker.models]``, ``[worker.execution]``, ``[worker.monitoring]``,
``[worker.security]``) plus four hypha sections (``[worker.resources]``,
``[worker.admission]``, ``[worker.batching]``, ``[worker.generation]``). Every key is declared once,
in :mod:`.schema`; anything else in the file is refused with a
did-you-mean. Checks that depend on this machine (can a network namespace be
made, is the port free) live in :mod:`hypha_celery.worker.hostcheck`, so that a
scheduler can parse a worker's file anywhere.
"""

from hypha_celery.config.derive import broker_urls, celery_settings, registry_url, result_backend_url
from hypha_celery.config.parse import config_path_from_env, load_config, parse_config, settings_config
from hypha_celery.config.schema import (
    DEFAULT_BROKER_URL,
    EX_CONFIG,
    KILL_GRACE_S,
    AdmissionConfig,
    BatchingConfig,
    ExecutionConfig,
    GenerationConfig,
    ModelsConfig,
    ModelSource,
    MonitoringConfig,
    NetworkConfig,
    ResourcesConfig,
    SecurityConfig,
    WorkerConfig,
)

__all__ = [
    "DEFAULT_BROKER_URL",
    "EX_CONFIG",
    "KILL_GRACE_S",
    "AdmissionConfig",
    "BatchingConfig",
    "ExecutionConfig",
    "GenerationConfig",
    "ModelSource",
    "ModelsConfig",
    "MonitoringConfig",
    "NetworkConfig",
    "ResourcesConfig",
    "SecurityConfig",
    "WorkerConfig",
    "broker_urls",
    "celery_settings",
    "config_path_from_env",
    "load_config",
    "parse_config",
    "registry_url",
    "result_backend_url",
    "settings_config",
]
