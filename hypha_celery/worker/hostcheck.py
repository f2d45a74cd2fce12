"""Can this machine honour the config? Checked when a worker starts, before it serves.

A key the machine cannot honour is refused with a ``ConfigError`` naming it,
never silently ignored.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import ConfigError
from hypha_celery.executor import landlock
from hypha_celery.executor.limits import NICE, enter_network_namespace
from hypha_celery.security.attestation import load_identity

__all__ = ["check_host"]


def check_host(cfg: WorkerConfig, *, metrics_port: int | None = None) -> None:
    """Raise ``ConfigError`` for the first key this machine cannot honour."""
    _check_isolation(cfg)
    if not sys.platform.startswith("linux"):
        for key, on in (("enforce_memory_limits", cfg.security.enforce_memory_limits),
                        ("enforce_cpu_limits", cfg.security.enforce_cpu_limits),
                        ("sandbox_enabled", cfg.execution.sandbox_enabled)):
            if on:
                section = "security" if key.startswith("enforce") else "execution"
                raise ConfigError(f"worker.{section}.{key}", f"needs Linux; this is {sys.platform}")
    if cfg.execution.sandbox_enabled:
        _probe_in_child(
            "worker.execution.sandbox_enabled",
            enter_network_namespace,
            "this kernel refuses a private network namespace for task processes ({error}); "
            "enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) "
            "or set sandbox_enabled = false",
        )
        _check_landlock()
    nice = NICE[cfg.execution.cpu_priority]
    if nice < 0:
        _probe_in_child(
            "worker.execution.cpu_priority",
            lambda: os.nice(nice),
            f"'{cfg.execution.cpu_priority}' needs permission to raise priority ({{error}}); "
            "run with CAP_SYS_NICE or use 'normal'",
        )
    _check_model_dir(cfg.models.model_dir)
    if cfg.security.sign_results:  # read, or made at first start, before the worker serves (NodeStep reads it again)
        load_identity(cfg.security.identity_key, cfg.models.model_dir)
    if cfg.monitoring.collect_metrics:
        _check_port(metrics_port or cfg.monitoring.metrics_port)
    from hypha_celery.resources.capabilities import node_capacity

    node_capacity(cfg)  # refuses cores, memory or GPUs the machine does not have


def _check_landlock() -> None:
    """The sandbox confines each executor's files with Landlock: the kernel must have it, and let us use it."""
    key = "worker.execution.sandbox_enabled"
    try:
        abi = landlock.abi_version()
    except OSError as exc:
        raise ConfigError(key, f"{landlock.unavailable_reason(exc)}; executors' files cannot be confined, "
                               "so the sandbox is refused; set sandbox_enabled = false to run without it") from None
    _probe_in_child(
        key,
        lambda: landlock.restrict([], abi),
        f"this kernel has Landlock (ABI {abi}) but refuses to apply it ({{error}}); "
        "set sandbox_enabled = false to run without the sandbox",
    )


def _check_isolation(cfg: WorkerConfig) -> None:
    mode = cfg.execution.isolation_mode
    if mode == "process":
        return
    runtime = {"container": ("docker", "podman"), "vm": ("firecracker", "qemu-system-x86_64")}[mode]
    found = [name for name in runtime if shutil.which(name)]
    where = f"{found[0]} is installed, but " if found else f"no {' or '.join(runtime)} found, and "
    raise ConfigError(
        "worker.execution.isolation_mode",
        f"'{mode}' is not supported: {where}this worker isolates tasks in spawned processes only; use 'process'",
    )


def _probe_in_child(key: str, action: object, message: str) -> None:
    """Try ``action`` in a forked child, so the worker itself is not changed by the probe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read)
        code = 0
        try:
            action()  # type: ignore[operator]
        except OSError as exc:
            os.write(write, (exc.strerror or str(exc)).encode()[:200])
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        detail = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise ConfigError(key, message.format(error=detail or "refused"))


def _check_model_dir(path: str) -> None:
    key = "worker.models.model_dir"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(key, f"cannot create {path}: {exc.strerror}") from None
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(key, f"{path} is not writable by this user (models are fetched and trained into it)")


def _check_port(port: int) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server binds
    try:
        probe.bind(("0.0.0.0", port))
    except OSError as exc:
        in_use = exc.errno == errno.EADDRINUSE
        reason = "is in use (another worker on this host? give each its own port)" if in_use else exc.strerror
        raise ConfigError("worker.monitoring.metrics_port", f"{port} {reason}; or use --hypha-metrics-port") from None
    finally:
        probe.close()
