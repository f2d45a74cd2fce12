"""Landlock: what an executor may read and write, enforced by the kernel (Linux >= 5.13, unprivileged).

Executors parse third-party model files with native code (tokenizers,
safetensors, onnxruntime). With ``sandbox_enabled`` an executor restricts
itself, before it imports torch, to:

* read: the model store, the Python installation (the prefixes, the directory
  of ``sys.executable``, every ``sys.path`` entry but the start-up directory,
  the ``hypha_celery`` package), the system's shared libraries (``/lib*``,
  ``/usr/lib*``, ``/usr/local/lib``, ``LD_LIBRARY_PATH``, ``/usr/local/cuda``,
  ``/usr/local/nvidia``, ``CUDA_HOME``), a few files of ``/etc`` (``ld.so.cache``,
  ``localtime``, ``passwd``, ``group``, ``nsswitch.conf``), ``/sys`` (CPU and GPU
  topology), ``/proc/self`` and system-wide ``/proc`` files (``cpuinfo``,
  ``meminfo``, ``stat``, ``sys``, ``driver/nvidia``, ...), not other processes'
  ``/proc/<pid>`` (the worker's ``environ`` holds its secrets);
* read and write: its temp dir, ``/dev/null``, ``/dev/zero``, ``/dev/full``,
  ``/dev/random``, ``/dev/urandom``, ``/dev/nvidia*`` (with device ``ioctl``),
  ``/proc/self/clear_refs`` (per-job peak memory) and its own threads' files under
  ``/proc/self/task`` (CUDA names its threads through ``comm`` at init);
* a training (job) executor besides: create files only under the store's
  staging folder ``<model_dir>/.incoming/``, its lock files in
  ``<model_dir>/.locks/`` and training checkpoints in ``<model_dir>/.checkpoints/``
  (:mod:`hypha_celery.training.checkpoints.local`: written, renamed and removed there), and a DiLoCo
  outer step's momentum in ``<model_dir>/.outer/`` (:mod:`hypha_celery.training.distributed.apply`),
  and create (by ``rename``) new model folders in ``model_dir``; it cannot
  change or remove an existing model.

Everything else (the worker's config, signing keys, other users' files,
``/tmp``) cannot be opened, listed or written: ``open`` fails with ``EACCES``,
also through a symlink planted in the store, since Landlock checks the file a
path resolves to. ``stat`` is not restricted.

Access rights newer than the kernel's ABI are dropped (best effort):
``REFER`` (ABI 2, renaming across directories), ``TRUNCATE`` (3),
``IOCTL_DEV`` (5). On ABI 1 (Linux 5.13-5.18) a process may not rename across
directories at all, so a training executor stages in ``model_dir`` itself and
may write anywhere in the store; serving executors stay read-only there.

The syscalls are called through ``ctypes``; their numbers (444-446) are the
same on every architecture Linux added them to after 5.1 (all but alpha).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from hypha_celery.training.checkpoints.local import CHECKPOINTS

__all__ = [
    "CHECKPOINTS",
    "DEVICE",
    "FULL",
    "LOCKS",
    "OUTER",
    "READ",
    "STAGING",
    "Rule",
    "abi_version",
    "executor_rules",
    "handled_access",
    "python_paths",
    "restrict",
    "unavailable_reason",
]

_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

# The rights a rule on a file (not a directory) may carry; others make landlock_add_rule fail.
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

READ = EXECUTE | READ_FILE | READ_DIR
FULL = (READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SOCK | MAKE_FIFO | MAKE_SYM
        | REFER | TRUNCATE)
DEVICE = READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV

STAGING = ".incoming"  # a training executor's staging folders, under model_dir
LOCKS = ".locks"  # the store's per-model lock files (ModelStore._lock)
OUTER = ".outer"  # a DiLoCo outer step's scratch: the deltas the worker fetched, the momentum the executor writes

_SYSTEM_READ = ("/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib",
                "/usr/local/cuda", "/usr/local/nvidia", "/sys",
                "/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
# Not all of /proc: a same-user process's /proc/<pid>/environ (the worker's secrets) is readable
# to PTRACE_MODE_READ, which Landlock domains do not restrict on every kernel.
_PROC_READ = ("/proc/self", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/loadavg", "/proc/version",
              "/proc/filesystems", "/proc/devices", "/proc/modules", "/proc/sys", "/proc/driver/nvidia")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/nvidia*",
            "/dev/nvidia-caps", "/dev/dxg")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in linux/landlock.h: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@dataclass(frozen=True)
class Rule:
    """``access`` beneath ``path`` (on the file or directory the path resolves to)."""

    path: str
    access: int


def _syscall() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    call = ctypes.CDLL(None, use_errno=True).syscall
    call.restype = ctypes.c_long
    return call


def _raise(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def abi_version() -> int:
    """The kernel's Landlock ABI version; ``OSError`` when it has none (``ENOSYS``, ``EOPNOTSUPP``)."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, f"Landlock needs Linux; this is {sys.platform}")
    version = _syscall()(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    if version < 0:
        _raise("landlock_create_ruleset")
    return int(version)


def unavailable_reason(error: OSError) -> str:
    """Why this kernel gives no Landlock, for an operator, from ``abi_version``'s error."""
    if error.errno == errno.ENOSYS:
        return ("this kernel has no Landlock (it needs Linux >= 5.13 built with CONFIG_SECURITY_LANDLOCK; "
                "gVisor and other user-space kernels lack it)")
    if error.errno == errno.EOPNOTSUPP:
        return "Landlock is built into this kernel but not enabled: add 'landlock' to the lsm= boot parameter"
    if error.errno == errno.EPERM:
        return "a seccomp filter (a container runtime's?) refuses the Landlock syscalls"
    return f"Landlock is unavailable ({error.strerror or error})"


def handled_access(abi: int) -> int:
    """The filesystem rights this ABI knows, all of which a ruleset then denies unless a rule grants them."""
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def python_paths(startup_dir: str | None = None) -> list[str]:
    """What this interpreter imports from: prefixes, the executable's directory, ``sys.path``, our package.

    ``sys.path[0]`` of ``python -m`` is the directory the process started in
    (the worker's), which may hold its config: it is left out (the package's
    own directory is listed, wherever it lives).
    """
    import hypha_celery

    package = Path(hypha_celery.__file__).resolve().parent
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, str(package),
             os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    startup = os.path.realpath(startup_dir) if startup_dir else None
    for entry in sys.path:
        if not entry or not os.path.isabs(entry):
            continue  # a relative entry names the working directory
        if startup and os.path.realpath(entry) == startup:
            continue
        paths.add(entry)
    return sorted(p for p in paths if p)


def executor_rules(*, store: str, tmpdir: str, trains: bool, abi: int,
                   startup_dir: str | None = None) -> list[Rule]:
    """The paths an executor may reach, and how (see the module docstring)."""
    rules = [Rule(path, READ) for path in python_paths(startup_dir)]
    rules += [Rule(path, READ) for path in _SYSTEM_READ + _PROC_READ]
    for variable in ("LD_LIBRARY_PATH", "CUDA_HOME"):
        rules += [Rule(entry, READ) for entry in os.environ.get(variable, "").split(":") if os.path.isabs(entry)]
    for pattern in _DEVICES:
        rules += [Rule(path, DEVICE) for path in sorted(glob.glob(pattern))]
    rules.append(Rule("/proc/self/clear_refs", WRITE_FILE | TRUNCATE))  # limits.reset_peak_rss opens it "w"
    # CUDA names its threads by opening /proc/self/task/<tid>/comm "w" (write, truncate); its init fails
    # (cudaErrorOperatingSystem, 304) when it cannot (seen on an H200 host, Landlock ABI 7).
    rules.append(Rule("/proc/self/task", READ | WRITE_FILE | TRUNCATE))
    rules.append(Rule(tmpdir, FULL))
    if not trains:
        rules.append(Rule(store, READ))
    elif abi >= 2:
        rules.append(Rule(store, READ | MAKE_DIR | REFER))
        rules.append(Rule(os.path.join(store, STAGING), FULL))
        rules.append(Rule(os.path.join(store, LOCKS), READ | WRITE_FILE | MAKE_REG | TRUNCATE))
        rules.append(Rule(os.path.join(store, CHECKPOINTS), FULL))
        rules.append(Rule(os.path.join(store, OUTER), FULL))
    else:
        rules.append(Rule(store, FULL))  # ABI 1 renames within one directory only: stage in model_dir
    return rules


def restrict(rules: list[Rule], abi: int, *, required: tuple[str, ...] = ()) -> None:
    """Allow this process (and its future children) only ``rules``; irrevocable.

    Call it while the process has one thread: Landlock restricts the calling
    thread and the threads it starts later, not those already running. A rule
    whose path is missing is skipped, unless it is one of ``required``.
    """
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise OSError(errno.EBUSY, f"Landlock must be applied while single-threaded ({len(threads)} threads)")
    handled = handled_access(abi)
    syscall = _syscall()
    attr = _RulesetAttr(handled_access_fs=handled)
    ruleset = syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                      ctypes.c_uint32(0))
    if ruleset < 0:
        _raise("landlock_create_ruleset")
    try:
        for rule in rules:
            _add_rule(syscall, int(ruleset), rule, handled, rule.path in required)
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            _raise("prctl(PR_SET_NO_NEW_PRIVS)")
        if syscall(_SYS_RESTRICT_SELF, ctypes.c_int(int(ruleset)), ctypes.c_uint32(0)) != 0:
            _raise("landlock_restrict_self")
    finally:
        os.close(int(ruleset))


def _add_rule(syscall: ctypes._CFuncPtr, ruleset: int, rule: Rule, handled: int,  # type: ignore[name-defined]
              required: bool) -> None:
    try:
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        if required:
            raise
        return
    try:
        access = rule.access & handled
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FILE_RIGHTS
        if not access:
            return
        attr = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
        if syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(attr),
                   ctypes.c_uint32(0)) != 0:
            _raise(f"landlock_add_rule({rule.path})")
    finally:
        if not rule.path.startswith("/proc/"):
            os.close(fd)
        # else: the O_PATH descriptor stays open, pinning the procfs dentry, so the inode the rule
        # names (procfs makes a new one per lookup of /proc/<pid>) is not dropped and re-created
        # without the rule under memory pressure
