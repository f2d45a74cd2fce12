"""Landlock for real: a process under the executor's rules tries to read and write around the store.

Each case runs in a fresh interpreter (a Landlock domain cannot be left). On a
kernel without Landlock these tests skip with the reason, except in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hypha_celery.executor import landlock

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_PROBE = r"""
import errno, json, os, sys
from hypha_celery.executor import limits

store, tmpdir, secret, outside, trains, abi = sys.argv[1:7]
staging = limits.confine_filesystem(store=store, tmpdir=tmpdir, trains=trains == "1", abi=int(abi) if abi else None)
results = {"staging": staging}

def attempt(name, action):
    try:
        action()
        results[name] = "ok"
    except OSError as exc:
        results[name] = errno.errorcode.get(exc.errno, str(exc.errno))

def write(path, text="x"):
    with open(path, "w") as handle:
        handle.write(text)

attempt("read store", lambda: open(os.path.join(store, "mlp", "manifest.json")).read())
attempt("list store", lambda: os.listdir(store))
attempt("read secret", lambda: open(secret).read())
attempt("list outside", lambda: os.listdir(outside))
attempt("stat secret", lambda: os.stat(secret))
attempt("write tmpdir", lambda: write(os.path.join(tmpdir, "scratch")))
attempt("write outside", lambda: write(os.path.join(outside, "dropped")))
attempt("write model file", lambda: write(os.path.join(store, "mlp", "manifest.json")))
attempt("create in store", lambda: write(os.path.join(store, "planted.json")))
attempt("rename model away", lambda: os.rename(os.path.join(store, "mlp"), os.path.join(store, "gone")))
attempt("write staging", lambda: write(os.path.join(store, ".incoming", "x")))

def checkpoint():  # as training.checkpoints.local writes, publishes and deletes one
    task = os.path.join(store, ".checkpoints", "task-1")
    os.makedirs(os.path.join(task, ".tmp-1"))
    write(os.path.join(task, ".tmp-1", "checkpoint.json"))
    os.rename(os.path.join(task, ".tmp-1"), os.path.join(task, "step-000000001"))
    import shutil
    shutil.rmtree(task)

attempt("write checkpoints", checkpoint)
attempt("read proc", lambda: open("/proc/self/status").read())
attempt("read worker environ", lambda: open(f"/proc/{os.getppid()}/environ").read())  # the worker's secrets
attempt("reset peak rss", lambda: write("/proc/self/clear_refs", "5"))  # as limits.reset_peak_rss
import threading
# As CUDA names its threads at init (pthread_setname_np opens the comm file "w"); not the worker's threads.
attempt("name a thread", lambda: write(f"/proc/self/task/{threading.get_native_id()}/comm", "cuda-EvtHandlr"))
attempt("name a worker thread", lambda: write(f"/proc/{os.getppid()}/task/{os.getppid()}/comm", "planted"))
attempt("write dev null", lambda: write("/dev/null"))
import torch  # what the executor imports once confined
attempt("torch", lambda: torch.ones(2).sum().item())
if trains == "1":  # as Executor.train stores a trained model
    from hypha_celery.formats.builtin import build
    from hypha_celery.models.store import ModelStore

    config = {"in_features": 4, "hidden": 8, "out_features": 3}
    attempt("save model", lambda: ModelStore(store, staging=staging).add(
        "builtin", build("mlp", config), "trained", architecture="mlp", config=config, input_shape=[4]))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def abi() -> int:
    try:
        return landlock.abi_version()
    except OSError as exc:
        if IN_CI:
            raise
        pytest.skip(landlock.unavailable_reason(exc))


def _probe(tmp_path: Path, model_dir: Path, *, trains: bool, abi: int | None = None) -> dict[str, str | None]:
    store = tmp_path / "models"
    shutil.copytree(model_dir, store, ignore=shutil.ignore_patterns(landlock.LOCKS, landlock.STAGING,
                                                                     landlock.CHECKPOINTS))
    (store / landlock.STAGING).mkdir()  # as a training executor leaves it
    (store / landlock.CHECKPOINTS).mkdir()
    tmpdir = tmp_path / "executor-tmp"
    tmpdir.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "worker.toml"
    secret.write_text('[worker.security]\nsigning_key = "do-not-leak"\n')
    out = subprocess.run([sys.executable, "-c", _PROBE, str(store), str(tmpdir), str(secret), str(outside),
                          "1" if trains else "0", "" if abi is None else str(abi)],
                         capture_output=True, text=True, timeout=120, cwd=outside)
    assert out.returncode == 0, out.stderr
    results: dict[str, str | None] = json.loads(out.stdout)
    return results


def test_a_serving_executor_reads_the_store_and_writes_only_its_temp_dir(
        abi: int, tmp_path: Path, model_dir: Path) -> None:
    # Given a process confined as a serving executor, started in a directory that holds the worker's config
    # When it tries to read and write inside and outside what it is allowed
    results = _probe(tmp_path, model_dir, trains=False)
    # Then the store, /proc, /dev/null and its temp dir work, torch imports and runs, and nothing else opens
    assert results == {
        "staging": None,
        "read store": "ok", "list store": "ok", "read proc": "ok", "reset peak rss": "ok", "write dev null": "ok",
        "name a thread": "ok", "name a worker thread": "EACCES",
        "torch": "ok",
        "write tmpdir": "ok", "stat secret": "ok",
        "read secret": "EACCES", "list outside": "EACCES", "write outside": "EACCES", "read worker environ": "EACCES",
        "write model file": "EACCES", "create in store": "EACCES", "rename model away": "EACCES",
        "write staging": "EACCES", "write checkpoints": "EACCES",
    }


def test_a_training_executor_may_also_stage_new_models_only(abi: int, tmp_path: Path, model_dir: Path) -> None:
    if abi < 2:
        pytest.skip(f"Landlock ABI {abi}: a training executor may write the whole store (no REFER)")
    # Given a process confined as a training (job) executor
    # When it saves a model, and tries to change what is stored
    results = _probe(tmp_path, model_dir, trains=True)
    # Then the model is staged under the store's .incoming and renamed into place; a stored model
    # cannot be changed or moved, and nothing outside opens
    assert results["staging"] == str(tmp_path / "models" / ".incoming")
    assert (results["save model"], results["write staging"], results["write tmpdir"]) == ("ok", "ok", "ok")
    assert results["write checkpoints"] == "ok" and not (tmp_path / "models" / ".checkpoints" / "task-1").exists()
    assert (tmp_path / "models" / "trained" / "manifest.json").is_file()
    denied = ("write model file", "create in store", "rename model away", "read secret", "write outside")
    assert {key: results[key] for key in denied} == dict.fromkeys(denied, "EACCES")


def test_on_abi_1_a_training_executor_stages_in_the_store_itself(abi: int, tmp_path: Path, model_dir: Path) -> None:
    # Given a process confined as a training executor with ABI 1's rights (renames within one folder only;
    # a newer kernel denies a rename across folders to such a ruleset, as ABI 1 does)
    # When it saves a model
    results = _probe(tmp_path, model_dir, trains=True, abi=1)
    # Then it stages in model_dir and the save works; outside the store stays closed
    assert results["staging"] is None and results["save model"] == "ok"
    assert (tmp_path / "models" / "trained" / "manifest.json").is_file()
    assert (results["read secret"], results["write outside"]) == ("EACCES", "EACCES")


def test_a_kernel_with_landlock_passes_the_workers_start_check(abi: int) -> None:
    from hypha_celery.worker import hostcheck

    # Given this kernel's Landlock, When the worker checks the host for sandbox_enabled, Then nothing is refused
    hostcheck._check_landlock()
