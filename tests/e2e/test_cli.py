"""The hypha-celery command line: keys, configs, the embedded Redis, a Redis that does not answer."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from hypha_celery.harness.launch import free_port
from hypha_celery.models.examples import TINY_CLASSIFIER, TINY_EMBEDDER
from hypha_celery.security import load_signing_key, peer_id
from tests.conftest import ROOT, WorkerProcess, worker_env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypha_celery.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)


def test_keys_generate_writes_a_private_key_and_prints_its_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.key"
    out = cli("keys", "generate", str(path))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"peer id:     {peer_id(load_signing_key(path).verify_key)}" in out.stdout
    # it never overwrites a key
    again = cli("keys", "generate", str(path))
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert cli("keys", "show", str(path)).stdout.strip() == peer_id(load_signing_key(path).verify_key)


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(f'[worker.models]\nmodel_dir = "{tmp_path}"\n[worker.monitoring]\ncollect_metrics = false\n')
    bad.write_text("[worker]\nmax_concurrent_taks = 2\n")
    assert cli("check-config", str(good)).returncode == 0
    result = cli("check-config", str(bad))
    assert result.returncode == 78
    assert "worker.max_concurrent_taks: unknown key (did you mean 'max_concurrent_tasks'?)" in result.stderr


def test_embedded_redis_prints_a_url_that_answers() -> None:
    process = subprocess.Popen([sys.executable, "-m", "hypha_celery.cli", "redis"], stdout=subprocess.PIPE, text=True,
                               cwd=ROOT)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.close()
    finally:
        process.terminate()
        assert process.wait(30) == 0
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.parametrize(("command", "variable"), [
    (["workers"], "HYPHA_REGISTRY_URL"),
    (["top", "--once"], "HYPHA_REGISTRY_URL"),
    (["run", "embed", "--model", "m", "hello"], "HYPHA_BROKER_URL"),
    (["run", "train", "--model", "m", "--dataset", "d"], "HYPHA_BROKER_URL"),
])
def test_a_command_with_no_redis_to_reach_says_so_in_one_line(command: list[str], variable: str) -> None:
    # Given a broker, result backend and registry URL where nothing listens (a free loopback port)
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {**os.environ, "HYPHA_BROKER_URL": url, "HYPHA_RESULT_BACKEND": url, "HYPHA_REGISTRY_URL": url}
    # When a command that talks to Redis runs
    done = cli(*command, env=env)
    # Then it fails with one line naming the address, the variable to set and how to start a Redis
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert url in lines[0] and variable in lines[0] and "`hypha-celery redis`" in lines[0]


def test_a_run_command_that_does_not_fit_the_model_names_the_one_that_does(
    start_worker: Callable[..., WorkerProcess], redis_url: str
) -> None:
    # Given a worker serving the tiny classifier and the tiny embedder
    start_worker()
    env = worker_env(redis_url, redis_url, redis_url)
    # When a person embeds with the classifier, and classifies with the embedder
    embed = cli("run", "embed", "--model", TINY_CLASSIFIER, "--timeout", "60", "a fine film", env=env)
    classify = cli("run", "classify", "--model", TINY_EMBEDDER, "--timeout", "60", "a fine film", env=env)
    # Then each stops with one line naming the command that fits, not a TypeError
    for done, fits in ((embed, f"run classify --model {TINY_CLASSIFIER}"), (classify, f"run embed --model {TINY_EMBEDDER}")):
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert fits in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_unsigned_run_on_a_verifying_worker_is_told_to_sign_with_a_key(
    start_worker: Callable[..., WorkerProcess], redis_url: str, tmp_path: Path
) -> None:
    # Given a worker that runs only tasks a known scheduler signed
    key = tmp_path / "scheduler.key"
    assert cli("keys", "generate", str(key)).returncode == 0
    start_worker({"security": {"verify_task_signatures": True,
                               "allowed_schedulers": [peer_id(load_signing_key(key).verify_key)]}})
    # When a person runs a task without --key
    done = cli("run", "embed", "--model", TINY_EMBEDDER, "--timeout", "60", "hello",
               env=worker_env(redis_url, redis_url, redis_url))
    # Then the refusal says how to sign it
    assert done.returncode == 1 and "InvalidSignature" in done.stderr, done.stderr
    assert "sign with --key" in done.stderr


def test_a_run_no_worker_answers_in_time_ends_on_one_line(redis_url: str) -> None:
    # Given a Redis that answers and no worker to take the task
    env = worker_env(redis_url, redis_url, redis_url)
    # When a run waits for its answer past --timeout
    done = cli("run", "embed", "--model", TINY_EMBEDDER, "--timeout", "1", "hello", env=env)
    # Then it says it timed out, in one line: no traceback from the pending result on the way out
    assert done.returncode == 1 and "TimeoutError" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
