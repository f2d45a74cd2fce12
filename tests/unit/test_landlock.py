"""The executor's Landlock rules, computed: which paths, which rights, per ABI; and the refusal at start."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

import hypha_celery
from hypha_celery.errors import ConfigError
from hypha_celery.executor import landlock
from hypha_celery.executor.landlock import (
    DEVICE,
    FULL,
    IOCTL_DEV,
    MAKE_DIR,
    MAKE_REG,
    READ,
    REFER,
    TRUNCATE,
    WRITE_FILE,
    Rule,
    executor_rules,
    handled_access,
    python_paths,
)
from hypha_celery.worker import hostcheck

STORE, TMP = "/srv/hypha/models", "/tmp/hypha-serve-cpu-x1"


def _by_path(rules: list[Rule]) -> dict[str, int]:
    found: dict[str, int] = {}
    for rule in rules:
        found[rule.path] = found.get(rule.path, 0) | rule.access
    return found


def _writable(rules: list[Rule]) -> set[str]:
    return {path for path, access in _by_path(rules).items() if access & (WRITE_FILE | MAKE_REG)}


def test_a_serving_executor_reads_the_store_and_writes_only_its_temp_dir_and_devices() -> None:
    rules = _by_path(executor_rules(store=STORE, tmpdir=TMP, trains=False, abi=5))
    assert rules[STORE] == READ and rules[TMP] == FULL
    assert rules["/dev/null"] == DEVICE and rules["/proc/self"] == READ and rules["/sys"] == READ
    assert "/proc" not in rules  # another process's /proc/<pid>/environ would be readable
    assert {path for path in _writable(executor_rules(store=STORE, tmpdir=TMP, trains=False, abi=5))
            if not path.startswith("/dev/")} == {TMP, "/proc/self/clear_refs", "/proc/self/task"}
    # its own threads' files (CUDA names its threads through comm at init), without creating or removing any
    assert rules["/proc/self/task"] == READ | WRITE_FILE | TRUNCATE


def test_a_training_executor_may_write_the_staging_folder_and_create_model_folders_only() -> None:
    rules = _by_path(executor_rules(store=STORE, tmpdir=TMP, trains=True, abi=2))
    assert rules[STORE] == READ | MAKE_DIR | REFER  # a rename from .incoming installs a new model
    assert rules[f"{STORE}/.incoming"] == FULL
    assert rules[f"{STORE}/.locks"] & (MAKE_REG | WRITE_FILE) == MAKE_REG | WRITE_FILE
    # ... and its checkpoints (written, renamed, removed), a DiLoCo outer step's scratch, and nothing else in the store
    assert rules[f"{STORE}/.checkpoints"] == FULL and rules[f"{STORE}/.outer"] == FULL
    assert {path for path in _writable(executor_rules(store=STORE, tmpdir=TMP, trains=True, abi=2))
            if path.startswith(STORE)} == {f"{STORE}/.incoming", f"{STORE}/.locks", f"{STORE}/.checkpoints",
                                           f"{STORE}/.outer"}


def test_a_serving_executor_may_not_write_checkpoints() -> None:
    assert f"{STORE}/.checkpoints" not in _by_path(executor_rules(store=STORE, tmpdir=TMP, trains=False, abi=5))


def test_on_abi_1_a_training_executor_writes_the_store_since_it_can_rename_within_one_folder_only() -> None:
    rules = _by_path(executor_rules(store=STORE, tmpdir=TMP, trains=True, abi=1))
    assert rules[STORE] == FULL and f"{STORE}/.incoming" not in rules


def test_the_python_installation_and_system_libraries_are_readable_but_not_etc_or_tmp() -> None:
    rules = _by_path(executor_rules(store=STORE, tmpdir=TMP, trains=False, abi=5))
    for path in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable), "/usr/lib", "/lib64",
                 "/etc/ld.so.cache", "/usr/local/cuda", "/usr/local/nvidia",
                 str(Path(hypha_celery.__file__).resolve().parent)):
        assert rules.get(path) == READ, path
    for path in ("/", "/etc", "/tmp", "/home", "/root", "/usr", "/var", "/etc/hypha", "/dev"):
        assert path not in rules, path


def test_ld_library_path_and_cuda_home_are_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/nvidia/lib64::relative/lib")
    monkeypatch.setenv("CUDA_HOME", "/opt/cuda-12")
    rules = _by_path(executor_rules(store=STORE, tmpdir=TMP, trains=False, abi=5))
    assert rules["/opt/nvidia/lib64"] == READ and rules["/opt/cuda-12"] == READ
    assert not any(path.startswith("relative") or path == "" for path in rules)


def test_the_directory_an_executor_started_in_is_not_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given `python -m` put the worker's start-up directory (say /etc/hypha, beside its config) on sys.path
    startup = tmp_path / "etc-hypha"
    startup.mkdir()
    monkeypatch.syspath_prepend(str(startup))
    # Then it is left out of the readable paths, while other sys.path entries stay
    assert str(startup) not in python_paths(str(startup))
    assert str(startup) in python_paths(None)
    assert sys.path[-1] in python_paths(str(startup))


def test_rights_newer_than_the_kernels_abi_are_not_handled() -> None:
    assert handled_access(1) == (1 << 13) - 1
    assert handled_access(2) & REFER and not handled_access(2) & TRUNCATE
    assert handled_access(3) & TRUNCATE and not handled_access(4) & IOCTL_DEV
    assert handled_access(5) & IOCTL_DEV and handled_access(7) == handled_access(5)


@pytest.mark.parametrize(("code", "says"), [
    (errno.ENOSYS, "Linux >= 5.13"),
    (errno.EOPNOTSUPP, "lsm="),
    (errno.EPERM, "seccomp"),
])
def test_a_kernel_without_landlock_refuses_the_sandbox_at_start_with_the_reason(
        monkeypatch: pytest.MonkeyPatch, code: int, says: str) -> None:
    # Given a kernel whose landlock_create_ruleset fails as a kernel without Landlock does
    def no_landlock() -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(landlock, "abi_version", no_landlock)
    # When the worker checks the host for sandbox_enabled = true, Then it refuses with the reason
    with pytest.raises(ConfigError, match="sandbox_enabled") as refused:
        hostcheck._check_landlock()
    assert says in str(refused.value) and "sandbox_enabled = false" in str(refused.value)
