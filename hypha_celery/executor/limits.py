"""Process limits an executor applies to itself: once at start, and per job.

At start (before torch is imported, while the process has one thread):
no core dumps, ``PR_SET_NO_NEW_PRIVS``, ``nice`` for ``cpu_priority``, and
with ``sandbox_enabled`` a fresh network namespace (an unprivileged user
namespace when not root) so task code can reach no network, and then a
Landlock ruleset (``confine_filesystem``, :mod:`hypha_celery.executor.landlock`)
so it can open only the store, its temp dir and what Python and torch need.

Per job: CPU affinity of every thread to the reserved cores
(``enforce_cpu_limits``), and a memory cap (``enforce_memory_limits``):
``RLIMIT_AS`` on CPU executors, an RSS watchdog where CUDA needs its large
virtual reservations.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hypha_celery.executor import landlock

__all__ = [
    "AS_SLACK",
    "NICE",
    "apply_static",
    "confine_filesystem",
    "current_rss",
    "current_vms",
    "enter_network_namespace",
    "memory_cap",
    "peak_rss",
    "pin_threads",
    "reset_peak_rss",
]

NICE = {"low": 10, "normal": 0, "high": -5}
# Address space a job may use beyond its reservation: thread stacks and
# allocator arenas are reserved, not resident, and RLIMIT_AS counts them.
AS_SLACK = 256 * 2**20

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_network_namespace() -> None:
    """Move this (single-threaded) process into a new, empty network namespace."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(network namespace): {os.strerror(err)}")
    if flags & _CLONE_NEWUSER:
        # Keep our own uid/gid visible inside the namespace.
        with open("/proc/self/setgroups", "w") as handle:
            handle.write("deny")
        with open("/proc/self/uid_map", "w") as handle:
            handle.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as handle:
            handle.write(f"{gid} {gid} 1")


def apply_static(*, nice: int, sandbox: bool) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if nice:
        os.nice(nice)
    if sandbox:
        enter_network_namespace()


def confine_filesystem(*, store: str, tmpdir: str, trains: bool, abi: int | None = None) -> str | None:
    """Restrict this (single-threaded) process's files with Landlock; the staging folder for new models.

    ``trains``: a job executor, which stages trained models under
    ``<store>/.incoming`` (``None``: in the store itself, on Landlock ABI 1) and
    writes checkpoints under ``<store>/.checkpoints``.
    ``abi``: the Landlock ABI to use, at most the kernel's (default: the kernel's).
    Raises ``OSError`` when the kernel has no Landlock.
    """
    kernel = landlock.abi_version()
    abi = kernel if abi is None else min(abi, kernel)
    staging = None
    if trains:
        Path(store, landlock.LOCKS).mkdir(parents=True, exist_ok=True)
        Path(store, landlock.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        Path(store, landlock.OUTER).mkdir(parents=True, exist_ok=True)
        if abi >= 2:
            staging = os.path.join(store, landlock.STAGING)
            os.makedirs(staging, exist_ok=True)
    rules = landlock.executor_rules(store=store, tmpdir=tmpdir, trains=trains, abi=abi, startup_dir=os.getcwd())
    landlock.restrict(rules, abi, required=(store, tmpdir))
    return staging


def pin_threads(cores: list[int]) -> None:
    """Set the affinity of every thread of this process (``sched_setaffinity(0)`` is one thread)."""
    wanted = set(cores)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), wanted)
        except OSError as exc:
            if exc.errno != errno.ESRCH:  # a thread that just exited
                raise


def _status_field(name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def current_rss() -> int:
    return _status_field("VmRSS")


def current_vms() -> int:
    return _status_field("VmSize")


def peak_rss() -> int:
    return _status_field("VmHWM")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS, so the next peak is this job's."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


@contextmanager
def memory_cap(limit: int | None, mode: str, on_exceeded: Callable[[int, int], None]) -> Iterator[None]:
    """Cap this process at ``limit`` more bytes than it uses now, for the ``with`` body.

    ``rlimit``: an allocation past the cap fails in place (torch raises
    ``RuntimeError``, Python ``MemoryError``). ``watchdog``: RSS is sampled
    every 20 ms and ``on_exceeded(rss, cap)`` is called once when it passes.
    """
    if limit is None or mode == "off":
        yield
        return
    if mode == "rlimit":
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = current_vms() + limit + AS_SLACK
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return
    cap = current_rss() + limit + AS_SLACK // 4
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            rss = current_rss()
            if rss > cap:
                on_exceeded(rss, cap)
                return

    thread = threading.Thread(target=watch, name="hypha-rss-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()

