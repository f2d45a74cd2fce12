"""Reading a worker's TOML: unknown keys refused with a did-you-mean, every value checked.

Checks that depend on this machine (can a network namespace be made, is the
port free) live in :mod:`hypha_celery.worker.hostcheck`, so that a scheduler
can parse a worker's file anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from hypha_celery.config.schema import SECTIONS, SOURCE_KEYS, ModelSource, WorkerConfig
from hypha_celery.errors import ConfigError
from hypha_celery.manifest import is_model_id  # the one definition of a model id, below config
from hypha_celery.units import parse_size

__all__ = ["config_path_from_env", "load_config", "parse_config", "settings_config"]


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
    """The config :mod:`hypha_celery.config.settings` derives Celery settings from: ``$HYPHA_CONFIG``, else defaults.

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
        if key in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"worker.{key}", "must be a table")
            values[key] = _parse_section(f"worker.{key}", SECTIONS[key], value)
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
    for section, cls in SECTIONS.items():
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
    if kind == "cores":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(key, f"expected a number of cores, got {_type_name(value)} {value!r}")
        if round(value * 1000) < 1:
            raise ConfigError(key, f"must be at least 0.001 cores, got {value}")
        if value > 1 and value != int(value):
            raise ConfigError(key, f"above 1 must be whole cores, got {value}")
        return float(value)
    if kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number of seconds, got {_type_name(value)} {value!r}")
        if value <= 0 or not math.isfinite(value):
            raise ConfigError(key, f"must be a positive number of seconds, got {value}")
        return float(value)
    if kind in ("size", "size|auto", "size|off"):
        if kind == "size|auto" and value == "auto":
            return None
        if kind == "size|off" and value in ("off", 0):
            return 0
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc) + {"size|auto": ' (or "auto")', "size|off": ' (or "off")'}.get(kind, "")) from None
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
    if kind == "storage":
        return _parse_storage(key, value)
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
        if kind not in SOURCE_KEYS:
            raise ConfigError(f"{where}.type", f"must be one of 'local', 'http', 's3'; got {kind!r}")
        allowed = SOURCE_KEYS[kind] | {"type"}
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


def _parse_storage(key: str, value: Any) -> ModelSource | None:
    """A writable storage (DiLoCo's shared storage): a local folder or an S3 bucket, never an HTTP source."""
    if isinstance(value, Mapping) and value.get("type") == "http":
        raise ConfigError(f"{key}.type", "'http' sources are read-only; shared storage must be 'local' or 's3'")
    try:
        return _parse_sources(key, [value])[0]
    except ConfigError as exc:  # name the key itself, not an array entry of it
        raise ConfigError(exc.key.replace(f"{key}[0]", key, 1), exc.reason) from None


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
    if cfg.generation.kv_budget == 0:
        raise ConfigError("worker.generation.kv_budget", 'must be a positive size or "auto" (0 would refuse every '
                                                         "generation)")
    if cfg.execution.serving_cpu_cores > cfg.max_cpu_cores_per_task:
        raise ConfigError("worker.execution.serving_cpu_cores",
                          f"{cfg.execution.serving_cpu_cores:g} is above worker.max_cpu_cores_per_task")
    for index, model in enumerate(cfg.models.preload):
        if not is_model_id(model):
            raise ConfigError(f"worker.models.preload[{index}]", f"{model!r} is not a model id")
    if cfg.models.preload and not cfg.execution.prewarm:
        raise ConfigError("worker.models.preload", "needs worker.execution.prewarm = true (models load into "
                                                   "the executors started at boot)")
