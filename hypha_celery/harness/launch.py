"""Local worker processes for the test suite, ``make bench`` and ``make demo``.

One launcher, so the three start, wait for and stop a ``celery worker`` the
same way: its own process group (executors included), output to a log file,
SIGTERM (a warm shutdown) and SIGKILL of the whole group if it does not stop.
Standard library only at import: the CLI's embedded Redis uses ``free_port``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "WorkerProcess",
    "client_app",
    "free_port",
    "scrape",
    "start_gateway",
    "start_worker",
    "wait_for",
    "worker_command",
    "worker_env",
    "write_worker_config",
]

T = TypeVar("T")


def free_port() -> int:
    """A loopback TCP port free right now (another process may still take it before it is bound)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def scrape(port: int) -> dict[str, float]:
    """One Prometheus scrape of a worker's metrics port on loopback, as ``{sample: value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def write_worker_config(path: Path, worker: Mapping[str, Any]) -> Path:
    """Write ``worker`` as the ``[worker]`` table of a TOML file for ``--hypha-config``."""
    import tomli_w

    path.write_text(tomli_w.dumps({"worker": dict(worker)}))
    return path


def client_app(broker: str, backend: str | None = None, name: str = "hypha-local-client") -> Celery:
    """A client Celery app with the worker's settings, sending to ``broker`` with no routing (tasks go to ``hypha``)."""
    from celery import Celery

    app = Celery(name)
    app.config_from_object("hypha_celery.config.settings")
    app.conf.update(broker_url=broker, result_backend=backend or broker, task_routes=())
    return app


def worker_env(broker: str, backend: str, registry: str, **extra: str) -> dict[str, str]:
    """This process's environment pointed at the given URLs, without an inherited ``HYPHA_CONFIG``."""
    env = dict(os.environ)
    env.update({
        "HYPHA_BROKER_URL": broker,
        "HYPHA_RESULT_BACKEND": backend,
        "HYPHA_REGISTRY_URL": registry,
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("HYPHA_CONFIG", None)
    env.update(extra)
    return env


def worker_command(
    name: str,
    *,
    app: str = "hypha_celery",
    config: Path | None = None,
    loglevel: str = "info",
    args: Sequence[str] = (),
) -> list[str]:
    """``celery -A app worker`` as this interpreter runs it; mingle and gossip off, as every local run wants."""
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "-n", f"{name}@%h", "-l", loglevel,
               "--without-mingle", "--without-gossip"]
    if config is not None:
        command += ["--hypha-config", str(config)]
    return [*command, *args]


@dataclass
class WorkerProcess:
    """A started worker: its process (leader of its own group), log file and environment."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]
    config: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 60, ready: Callable[[], bool] | None = None) -> None:
        """Until ``ready()`` (default: Celery's ``ready.`` line, logged at level info); ``RuntimeError`` if it exits."""
        check = ready or (lambda: "ready." in self.output())
        try:
            wait_for(lambda: not self.alive() or check(), timeout, f"worker {self.name} to be ready")
        except TimeoutError:
            raise TimeoutError(f"worker {self.name} not ready after {timeout}s; see {self.log}") from None
        if not self.alive():
            raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}:\n{self.output()[-3000:]}")

    def kill9(self) -> None:
        """SIGKILL the worker and every process it started (its process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (a warm shutdown), SIGKILL after ``timeout``; then SIGKILL whatever it left in its group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.process.returncode


def start_gateway(env: Mapping[str, str], log: Path, *args: str, cwd: Path | None = None,
                  timeout: float = 60) -> tuple[subprocess.Popen[bytes], str]:
    """``hypha-celery gateway`` on a free port (``args`` added), output to ``log``, once it answers HTTP; returns the
    process and its base URL (``http://127.0.0.1:<port>/v1``). ``RuntimeError`` if it exits first, ``TimeoutError``
    (the process killed) after ``timeout`` seconds."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "hypha_celery.cli", "gateway", "--port", str(port), *args],
                                   env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}/v1"

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # it answered (a 401 without a key is an answer)
        except OSError:
            return False
        return True

    try:
        wait_for(answers, timeout, f"the gateway to answer HTTP (see {log})", interval=0.2)
    except TimeoutError:
        process.kill()
        raise
    return process, url


def start_worker(
    name: str,
    log: Path,
    env: dict[str, str],
    *,
    app: str = "hypha_celery",
    config: Path | None = None,
    loglevel: str = "info",
    args: Sequence[str] = (),
    cwd: Path | None = None,
) -> WorkerProcess:
    """Start a worker in a new session (so ``stop`` reaches its executors too), stdout and stderr to ``log``."""
    command = worker_command(name, app=app, config=config, loglevel=loglevel, args=args)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return WorkerProcess(name=name, process=process, log=log, env=env, config=config)
