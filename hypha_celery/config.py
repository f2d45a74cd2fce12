"""The worker's TOML configuration: load, validate, and derive Celery settings.

The file has the seed's sections (``[worker]``, ``[worker.network]``,
``[worker.models]``, ``[worker.execution]``, ``[worker.monitoring]``,
``[worker.security]``) plus three hypha sections (``[worker.resources]``,
``[worker.admission]``, ``[worker.batching]``). Every key is declared once,
in the dataclasses below; anything else in the file is refused with a
did-you-mean. Checks that depend on this machine (can a network namespace be
made, is the port free) live in :mod:`hypha_celery.hostcheck`, so that a
scheduler can parse a worker's file anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .units import parse_size

__all__ = [
    "DEFAULT_BROKER_URL",
    "AdmissionConfig",
    "BatchingConfig",
    "ExecutionConfig",
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

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
EX_CONFIG = 78  # sysexits.h: configuration error; systemd units stop restarting on it

# Seconds between SIGTERM and SIGKILL when a task overruns ``task_timeout``.
KILL_GRACE_S = 3.0


def _key(kind: str, default: Any, **rules: Any) -> Any:
    """Declare one config key: its kind drives parsing, ``rules`` its checks."""
    meta = {"kind": kind, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSource:
    """One ``[[worker.models.sources]]`` entry, tried in order."""

    type: str
    path: str | None = None
    url: str | None = None
    bucket: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    prefix: str = ""


@dataclass(frozen=True)
class NetworkConfig:
    gateway_addresses: list[str] = _key("urls", [])
    advertisement_interval: float = _key("seconds", 60.0)
    result_backend: str | None = _key("url?", None)
    registry_url: str | None = _key("url?", None)


@dataclass(frozen=True)
class ModelsConfig:
    model_dir: str = _key("str", "/var/lib/hypha/models")
    sources: list[ModelSource] = _key("sources", [])
    max_model_size: int = _key("size", 4 * 10**9)


@dataclass(frozen=True)
class ExecutionConfig:
    isolation_mode: str = _key("str", "process", choices=("process", "container", "vm"))
    sandbox_enabled: bool = _key("bool", True)
    cpu_priority: str = _key("str", "normal", choices=("low", "normal", "high"))
    gpu_sharing: bool = _key("bool", False)


@dataclass(frozen=True)
class MonitoringConfig:
    monitor_interval: float = _key("seconds", 5.0)
    collect_metrics: bool = _key("bool", True)
    metrics_port: int = _key("port", 9091)


@dataclass(frozen=True)
class SecurityConfig:
    verify_task_signatures: bool = _key("bool", True)
    allowed_schedulers: list[str] = _key("strs", [])
    enforce_memory_limits: bool = _key("bool", True)
    enforce_cpu_limits: bool = _key("bool", True)
    max_input_bytes: int = _key("size", 64 * 2**20)
    max_envelope_age: float = _key("seconds", 3600.0)


@dataclass(frozen=True)
class ResourcesConfig:
    node_id: str | None = _key("str?", None)
    cpu_cores: int | None = _key("count?", None)
    memory: int | None = _key("size?", None)
    gpus: list[int] | None = _key("indices?", None)
    lease_heartbeat: float = _key("seconds", 5.0)


@dataclass(frozen=True)
class AdmissionConfig:
    max_wait: float = _key("seconds", 600.0)
    backoff_initial: float = _key("seconds", 0.5)
    backoff_max: float = _key("seconds", 10.0)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = _key("count", 32)
    max_queue_delay_microseconds: int = _key("count0", 2000)


@dataclass(frozen=True)
class WorkerConfig:
    """The whole ``[worker]`` table; defaults are the seed's example values."""

    max_concurrent_tasks: int = _key("count", 4)
    max_memory_per_task: int = _key("size", 8 * 10**9)
    max_cpu_cores_per_task: int = _key("count", 4)
    task_timeout: float = _key("seconds", 300.0)
    model_cache_size: int = _key("size", 20 * 10**9)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    source_path: str | None = field(default=None, compare=False)

    @property
    def soft_time_limit(self) -> float:
        """Celery's soft limit: past our own kill (task_timeout + grace), a backstop."""
        return self.task_timeout + KILL_GRACE_S + 5.0

    @property
    def hard_time_limit(self) -> float:
        return self.task_timeout + KILL_GRACE_S + 15.0

    @property
    def visibility_timeout(self) -> int:
        """Longest a Redis-delivered message may stay unacked before redelivery.

        A message is unacked while it waits out an admission backoff (at most
        ``backoff_max``) and while it runs (at most the hard limit); Celery
        #5935 is what happens when this is shorter than a run.
        """
        return math.ceil(self.hard_time_limit + self.admission.backoff_max + 10.0)


_SECTIONS = {
    "network": NetworkConfig,
    "models": ModelsConfig,
    "execution": ExecutionConfig,
    "monitoring": MonitoringConfig,
    "security": SecurityConfig,
    "resources": ResourcesConfig,
    "admission": AdmissionConfig,
    "batching": BatchingConfig,
}

_SOURCE_KEYS = {
    "local": {"path"},
    "http": {"url"},
    "s3": {"bucket", "region", "endpoint_url", "prefix"},
}


def config_path_from_env() -> str | None:
    return os.environ.get("HYPHA_CONFIG") or None


def load_config(path: str | os.PathLike[str] | None = None) -> WorkerConfig:
    """Read and validate the TOML at ``path`` (or ``$HYPHA_CONFIG``; defaults if neither)."""
    path = path or config_path_from_env()
    if not path:
        return WorkerConfig()
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    return parse_config(data, source_path=os.fspath(path))


def settings_config() -> WorkerConfig:
    """The config ``celeryconfig.py`` derives Celery settings from: ``$HYPHA_CONFIG``, else defaults.

    A bad file is logged and the defaults are used, so importing the app (in
    a scheduler, Flower, ``celery inspect``) never dies on it; a worker checks
    the file again at start and refuses it there.
    """
    try:
        return load_config()
    except ConfigError as exc:
        logging.getLogger(__name__).error("ignoring $HYPHA_CONFIG for Celery settings: %s", exc)
        return WorkerConfig()


def parse_config(data: Mapping[str, Any], source_path: str | None = None) -> WorkerConfig:
    """Validate an already-parsed TOML document."""
    unknown = set(data) - {"worker"}
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(name, "unknown table; every key lives under [worker]" + _suggest(name, ["worker"]))
    worker = data.get("worker", {})
    if not isinstance(worker, Mapping):
        raise ConfigError("worker", "must be a table")
    top_fields = {f.name: f for f in dataclasses.fields(WorkerConfig) if "kind" in f.metadata}
    values: dict[str, Any] = {}
    for key, value in worker.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"worker.{key}", "must be a table")
            values[key] = _parse_section(f"worker.{key}", _SECTIONS[key], value)
        elif key in top_fields:
            values[key] = _parse_value(f"worker.{key}", top_fields[key].metadata, value)
        else:
            raise ConfigError(f"worker.{key}", "unknown key" + _suggest_anywhere(key, "worker"))
    cfg = WorkerConfig(**values, source_path=source_path)
    _check_consistency(cfg)
    return cfg


def _parse_section(prefix: str, cls: type, table: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}", "unknown key" + _suggest_anywhere(key, prefix))
        values[key] = _parse_value(f"{prefix}.{key}", fields[key].metadata, value)
    return cls(**values)


def _all_keys() -> dict[str, str]:
    """Every valid key name -> the table it belongs to."""
    keys = {f.name: "worker" for f in dataclasses.fields(WorkerConfig) if "kind" in f.metadata}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            keys.setdefault(f.name, f"worker.{section}")
    return keys


def _suggest_anywhere(key: str, here: str) -> str:
    known = _all_keys()
    if key in known and known[key] != here:
        return f"; it belongs in [{known[key]}]"
    return _suggest(key, [name for name, table in known.items() if table == here] or list(known))


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key, list(_all_keys()), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _parse_value(key: str, meta: Mapping[str, Any], value: Any) -> Any:
    kind: str = meta["kind"]
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if optional and value is None:
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_type_name(value)} {value!r}")
        return value
    if kind in ("count", "count0", "port"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_type_name(value)} {value!r}")
        floor = 0 if kind == "count0" else 1
        if value < floor:
            raise ConfigError(key, f"must be at least {floor}, got {value}")
        if kind == "port" and value > 65535:
            raise ConfigError(key, f"must be a TCP port (1-65535), got {value}")
        return value
    if kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number of seconds, got {_type_name(value)} {value!r}")
        if value <= 0 or not math.isfinite(value):
            raise ConfigError(key, f"must be a positive number of seconds, got {value}")
        return float(value)
    if kind == "size":
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    if kind in ("str", "url"):
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_type_name(value)} {value!r}")
        if not value.strip():
            raise ConfigError(key, "must not be empty")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
        if kind == "url":
            _check_url(key, value)
        return value
    if kind in ("strs", "urls"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected an array of strings, got {_type_name(value)} {value!r}")
        if kind == "urls":
            for index, url in enumerate(value):
                _check_url(f"{key}[{index}]", url)
        return list(value)
    if kind == "indices":
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ConfigError(key, f"expected an array of device indices (integers >= 0), got {value!r}")
        if len(set(value)) != len(value):
            raise ConfigError(key, f"lists a device twice: {value!r}")
        return list(value)
    if kind == "sources":
        return _parse_sources(key, value)
    raise ConfigError(key, f"internal: unknown kind {kind}")


def _check_url(key: str, url: str) -> None:
    if url.startswith("/ip4/") or url.startswith("/ip6/") or url.startswith("/dns"):
        raise ConfigError(
            key,
            f"{url!r} is a libp2p multiaddr; this worker joins through a Celery broker, "
            "so give a broker URL such as 'redis://host:6379/0' or 'amqp://user:pass@host:5672//'",
        )
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("redis", "rediss", "amqp", "amqps", "pyamqp", "sentinel", "unix", "memory"):
        raise ConfigError(key, f"{url!r} is not a broker URL (expected redis://, rediss://, amqp:// or amqps://)")


def _parse_sources(key: str, value: Any) -> list[ModelSource]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected an array of tables ([[{key}]]), got {_type_name(value)}")
    sources = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(where, "expected a table with a 'type' key")
        kind = entry.get("type")
        if kind not in _SOURCE_KEYS:
            raise ConfigError(f"{where}.type", f"must be one of 'local', 'http', 's3'; got {kind!r}")
        allowed = _SOURCE_KEYS[kind] | {"type"}
        for name, item in entry.items():
            if name not in allowed:
                raise ConfigError(f"{where}.{name}", f"unknown key for a {kind} source" + _suggest(name, sorted(allowed)))
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{where}.{name}", f"expected a non-empty string, got {item!r}")
        required = {"local": ("path",), "http": ("url",), "s3": ("bucket",)}[kind]
        for name in required:
            if name not in entry:
                raise ConfigError(f"{where}.{name}", f"required for a {kind} source")
        if kind == "http" and not entry["url"].startswith(("http://", "https://")):
            raise ConfigError(f"{where}.url", f"expected an http:// or https:// URL, got {entry['url']!r}")
        fields = dict(entry)
        if fields.get("prefix") and not fields["prefix"].endswith("/"):
            fields["prefix"] += "/"  # "models" means the folder models/, not keys starting "models"
        sources.append(ModelSource(**fields))
    return sources


def _check_consistency(cfg: WorkerConfig) -> None:
    """Checks that span keys; each still names the key an operator should change."""
    if cfg.admission.backoff_initial > cfg.admission.backoff_max:
        raise ConfigError(
            "worker.admission.backoff_initial",
            f"{cfg.admission.backoff_initial}s is above backoff_max ({cfg.admission.backoff_max}s)",
        )
    if cfg.models.max_model_size > cfg.model_cache_size:
        raise ConfigError(
            "worker.models.max_model_size",
            "is larger than worker.model_cache_size; such a model could be fetched but never cached",
        )


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
    """The Celery settings this worker config implies (see ``celeryconfig.py`` for why)."""
    urls = broker_urls(cfg, environ)
    return {
        "broker_url": urls if len(urls) > 1 else urls[0],
        "result_backend": result_backend_url(cfg, environ),
        "task_soft_time_limit": cfg.soft_time_limit,
        "task_time_limit": cfg.hard_time_limit,
        "worker_concurrency": cfg.max_concurrent_tasks,
        "broker_transport_options": {
            "visibility_timeout": cfg.visibility_timeout,
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
        },
        "result_backend_transport_options": {"visibility_timeout": cfg.visibility_timeout},
    }
