"""Executor processes for real: sandbox, limits, batching, timeouts, memory caps, the model cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch

from hypha_celery.errors import (
    ExecutionError,
    ExecutorCrashed,
    InvalidInput,
    MemoryLimitExceeded,
    ModelTooLarge,
    TaskTimeout,
    UnsupportedModel,
)
from hypha_celery.executor.pool import ExecutorPool
from hypha_celery.executor.process import ExecutorSettings
from hypha_celery.formats.builtin import build
from hypha_celery.models.examples import TINY_LLAMA, clusters
from hypha_celery.models.store import ModelStore
from hypha_celery.resources.ledger import Lease
from hypha_celery.stages.validation import GenerateParams
from hypha_celery.work import Generate, Progress, Prompt, Train

ROW = [5.0, 3.4, 1.5, 0.2]


def lease(memory: int = 512 * 2**20, cores: dict[int, int] | None = None) -> Lease:
    return Lease(id="l", node="n", memory=memory, cores=cores if cores is not None else {0: 1000}, gpus={},
                 exclusive_gpu=False)


@pytest.fixture
def store_dir(tmp_path: Path, model_dir: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns(".locks"))
    return target


def make_pool(store_dir: Path, **overrides: object) -> ExecutorPool:
    settings = {"store": str(store_dir), "cache_size": 10**8, "max_model_size": 10**8, "sandbox": True, "nice": 0,
                "enforce_memory": True, "enforce_cpu": True, "max_batch_size": 32, "max_queue_delay_s": 0.05}
    settings.update(overrides)
    return ExecutorPool(ExecutorSettings(**settings))  # type: ignore[arg-type]


@pytest.fixture
def pool(store_dir: Path):
    pool = make_pool(store_dir)
    yield pool
    pool.close()


def test_executor_is_sandboxed(pool: ExecutorPool) -> None:
    # Given a serving executor, Then it has its own empty network namespace, a private temp dir,
    # none of the worker's environment, and the memory cap mode for a CPU process
    info = pool.describe("cpu")
    assert info.net_namespace != os.readlink("/proc/self/ns/net")
    assert info.interfaces == ["lo"]
    assert info.tmpdir == info.cwd and "hypha-serve-cpu" in info.tmpdir
    assert "HYPHA_BROKER_URL" not in info.environment and "AWS_SECRET_ACCESS_KEY" not in info.environment
    assert info.memory_mode == "rlimit" and info.pid != os.getpid()


def test_low_priority_executors_are_niced(store_dir: Path) -> None:
    pool = make_pool(store_dir, nice=10)
    try:
        assert pool.describe("cpu").nice == 10
    finally:
        pool.close()


def test_inference_runs_on_the_reserved_cores(pool: ExecutorPool) -> None:
    item = pool.infer(model="mlp", inputs=[ROW], lease=lease(cores={1: 500}), timeout=60, batchable=True)
    assert item.cpu_affinity == [1]
    first = item
    again = pool.infer(model="mlp", inputs=[ROW], lease=lease(cores={0: 1000}), timeout=60, batchable=True)
    assert again.cpu_affinity == [0]
    assert not first.cache_hit and again.cache_hit and again.load_s == 0


def test_concurrent_requests_batch_and_each_gets_its_own_rows(pool: ExecutorPool) -> None:
    rows, _ = clusters(24, seed=5)
    alone = [pool.infer(model="mlp", inputs=[row], lease=lease(), timeout=60, batchable=True).output[0] for row in rows]
    results: dict[int, object] = {}

    def ask(index: int) -> None:
        results[index] = pool.infer(model="mlp", inputs=[rows[index]], lease=lease(), timeout=60, batchable=True)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batch_sizes = {results[i].batch_size for i in range(len(rows))}  # type: ignore[attr-defined]
    assert max(batch_sizes) > 1
    for i, expected in enumerate(alone):
        assert torch.allclose(torch.tensor(results[i].output[0]), torch.tensor(expected), atol=1e-5)  # type: ignore[attr-defined]


def test_eight_concurrent_cold_requests_load_the_model_once(pool: ExecutorPool) -> None:
    items = []
    lock = threading.Lock()

    def ask() -> None:
        item = pool.infer(model="cnn", inputs=[[[0.5] * 28] * 28], lease=lease(), timeout=60, batchable=True)
        with lock:
            items.append(item)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then exactly one of them loaded it; the others shared that load or hit the cache
    loads = [item for item in items if not item.cache_hit]
    assert len(items) == 8 and len(loads) == 1 and loads[0].load_s > 0
    assert all(item.load_s == 0 for item in items if item.cache_hit)


def _wide_model(store_dir: Path) -> str:
    """A model whose activations for a big batch need ~2 GB: a memory bomb inside a real architecture."""
    store = ModelStore(store_dir)
    config = {"in_features": 4, "hidden": 500_000, "out_features": 3}
    torch.manual_seed(0)
    store.add("builtin", build("mlp", config), "wide", architecture="mlp", config=config, input_shape=[4])
    return "wide"


@pytest.mark.parametrize("mode", ["rlimit", "watchdog"])
def test_a_memory_bomb_fails_alone(store_dir: Path, mode: str) -> None:
    pool = make_pool(store_dir, memory_mode=mode, max_queue_delay_s=0.0)
    model = _wide_model(store_dir)
    try:
        # When a task that reserved 256 MiB makes activations of about 2 GB
        with pytest.raises(MemoryLimitExceeded, match="memory"):
            pool.infer(model=model, inputs=[ROW] * 1000, lease=lease(memory=256 * 2**20), timeout=120, batchable=True)
        # Then a small task on the same pool still runs
        assert pool.infer(model="mlp", inputs=[ROW], lease=lease(), timeout=60, batchable=True).output
    finally:
        pool.close()


def test_a_task_past_its_timeout_is_killed(pool: ExecutorPool) -> None:
    rows, labels = clusters(3000, seed=1)
    job = Train(model="mlp", new_model="never", epochs=100_000, lr=0.01, batch_size=8,
                data={"inputs": rows, "targets": labels})
    with pytest.raises(TaskTimeout, match="task_timeout"):
        pool.run_job(job, lease=lease(), timeout=2)
    # the next job gets a fresh executor
    done = pool.run_job(Train(model="mlp", new_model="after-timeout", epochs=1, lr=0.01, batch_size=8,
                              data={"inputs": rows, "targets": labels}), lease=lease(), timeout=60)
    assert done.model_id == "after-timeout"


def test_training_reports_progress_and_stores_a_new_model(pool: ExecutorPool, store_dir: Path) -> None:
    rows, labels = clusters(600, seed=2)
    updates: list[Progress] = []
    result = pool.run_job(Train(model="mlp", new_model="mlp-trained", epochs=40, lr=0.01, batch_size=16,
                                data={"inputs": rows, "targets": labels}, progress_interval=0.0),
                          lease=lease(), timeout=120, on_progress=updates.append)
    assert len(updates) >= 3 and updates[-1].percent == 100.0
    assert result.trained.loss_curve[-1] < result.trained.loss_curve[0]
    manifest = ModelStore(store_dir).manifest("mlp-trained")
    assert manifest.parent == "mlp"
    assert pool.infer(model="mlp-trained", inputs=[ROW], lease=lease(), timeout=60, batchable=True).output


def _plant_symlink(store_dir: Path, tmp_path: Path) -> str:
    """A model ``mlp-planted`` whose weights are a symlink, planted in the store, to the worker's config.

    The stand-in config (a signing key in it) lies outside the store and the executor's temp dir, padded to
    the weights' size so the executor gets past the size check and opens the file to hash it.
    """
    planted = store_dir / "mlp-planted"
    shutil.copytree(store_dir / "mlp", planted)
    manifest = json.loads((planted / "manifest.json").read_text())
    (planted / "manifest.json").write_text(json.dumps({**manifest, "id": "mlp-planted"}))
    weights = planted / "weights.safetensors"
    secret = tmp_path / "worker.toml"
    secret.write_bytes(b'[worker.security]\nsigning_key = "do-not-leak"\n'.ljust(weights.stat().st_size, b"#"))
    weights.unlink()
    weights.symlink_to(secret)
    return "mlp-planted"


def test_a_symlink_planted_in_the_store_cannot_reach_the_workers_files(pool: ExecutorPool, store_dir: Path,
                                                                      tmp_path: Path) -> None:
    # Given a model whose weights file is a symlink, planted in the store, to the worker's config
    planted = _plant_symlink(store_dir, tmp_path)
    # When a task asks the sandboxed executor for it
    with pytest.raises(ExecutionError, match="PermissionError") as refused:
        pool.infer(model=planted, inputs=[ROW], lease=lease(), timeout=60, batchable=True)
    # Then the kernel refused the open (without the sandbox it is read, and refused by its sha256
    # only after its bytes went through the executor), and the store's own model still serves
    assert "Permission denied" in str(refused.value) and "do-not-leak" not in str(refused.value)
    assert pool.infer(model="mlp", inputs=[ROW], lease=lease(), timeout=60, batchable=True).output


def test_a_training_executor_cannot_read_a_data_set_outside_the_store(pool: ExecutorPool, store_dir: Path,
                                                                      tmp_path: Path) -> None:
    # Given a data set file outside the store (the worker hands over only the store's own data sets)
    rows, labels = clusters(40, seed=3)
    outside = tmp_path / "data.json"
    outside.write_text(json.dumps({"inputs": rows, "targets": labels}))
    # When a training job names it
    with pytest.raises(ExecutionError, match="Permission denied"):
        pool.run_job(Train(model="mlp", new_model="from-outside", epochs=1, lr=0.01, batch_size=8,
                           data_path=str(outside)), lease=lease(), timeout=60)
    # Then nothing was trained from it; the same executor trains on inline rows into the store
    assert not ModelStore(store_dir).has("from-outside")
    done = pool.run_job(Train(model="mlp", new_model="from-inline", epochs=1, lr=0.01, batch_size=8,
                              data={"inputs": rows, "targets": labels}), lease=lease(), timeout=60)
    assert ModelStore(store_dir).manifest(done.model_id).parent == "mlp"


def test_without_the_sandbox_the_planted_symlink_is_read(store_dir: Path, tmp_path: Path) -> None:
    # Given the planted symlink of the test above, and an executor without the sandbox
    planted = _plant_symlink(store_dir, tmp_path)
    pool = make_pool(store_dir, sandbox=False)
    try:
        # Then the executor opened and hashed the worker's file: only the manifest's sha256 refused it
        with pytest.raises(UnsupportedModel, match="sha256"):
            pool.infer(model=planted, inputs=[ROW], lease=lease(), timeout=60, batchable=True)
    finally:
        pool.close()


def test_a_model_bigger_than_the_cache_is_an_error(store_dir: Path) -> None:
    pool = make_pool(store_dir, cache_size=1000)
    try:
        with pytest.raises(ModelTooLarge, match="model_cache_size"):
            pool.infer(model="cnn", inputs=[[[0.0] * 28] * 28], lease=lease(), timeout=60, batchable=True)
    finally:
        pool.close()


def test_a_gpu_lane_sees_only_its_device(pool: ExecutorPool) -> None:
    # An executor for physical GPU 1 is started with CUDA_VISIBLE_DEVICES=1 (the task sees cuda:0),
    # and caps memory with the RSS watchdog, since CUDA needs large virtual reservations
    info = pool.describe("cuda:1")
    assert info.cuda_visible_devices == "1" and info.memory_mode == "watchdog"
    assert pool.describe("cpu").cuda_visible_devices == ""


def test_the_executors_traceback_reaches_the_worker(pool: ExecutorPool) -> None:
    # Given inputs that make torch raise inside the executor (3 features for a model that takes 4)
    # When the worker runs them
    with pytest.raises(ExecutionError, match="RuntimeError") as raised:
        pool.infer(model="mlp", inputs=[[1.0, 2.0, 3.0]], lease=lease(), timeout=60, batchable=True)
    # Then the error's formatted traceback (what the worker logs and Celery stores) holds the
    # executor's frames, down to the runtime function that raised
    formatted = "".join(traceback.format_exception(raised.value))
    assert "hypha_celery/runtimes/builtin.py" in formatted and "in infer_batch" in formatted


_SERVE_ALL = """
import socket, sys
from hypha_celery.executor.child import Executor, _Channel
from hypha_celery.protocol import ChildSettings, Describe
from hypha_celery.work import Infer, Train
ours, theirs = socket.socketpair()
settings = ChildSettings(store=sys.argv[1], cache_size=10**8, max_model_size=10**8, device="cpu", sandbox=False,
                         nice=0, memory_mode="off", tmpdir=sys.argv[2])
executor = Executor(settings, _Channel(theirs))
executor.handle(Infer(model="mlp", items=[[[5.0, 3.4, 1.5, 0.2]]]))
executor.handle(Describe())
executor.handle(Train(model="mlp", new_model="mlp-imports", epochs=1, lr=0.01, batch_size=2, progress_interval=60.0,
                      data={"inputs": [[5.0, 3.4, 1.5, 0.2]] * 4, "targets": [0, 1, 2, 0]}))
print(" ".join(sorted(name for name in ("celery", "kombu", "redis", "nacl") if name in sys.modules)) or "none")
"""


def test_an_executor_serving_every_request_imports_no_celery_redis_or_nacl(store_dir: Path, tmp_path: Path) -> None:
    # Given a fresh interpreter that runs the executor's code for every request kind (inference, training,
    # describe), as `python -m hypha_celery.executor.child` does, minus the socket to a worker
    scratch = tmp_path / "scratch"  # the executor empties its temp dir after each job
    scratch.mkdir()
    out = subprocess.run([sys.executable, "-c", _SERVE_ALL, str(store_dir), str(scratch)],
                         capture_output=True, text=True, timeout=120)
    # Then none of the worker's broker, result-backend or signing libraries was imported
    assert (out.returncode, out.stdout.strip()) == (0, "none"), out.stderr


def test_prewarm_starts_the_executor_and_preloads_so_the_first_request_is_warm(pool: ExecutorPool) -> None:
    # Given a pool whose cpu executor is started and "mlp" preloaded before any request
    loaded = pool.prewarm("cpu", [("mlp", None)])
    assert set(loaded) == {"mlp"} and pool.cache()["cpu"].keys() == {"mlp"}
    # When the first request arrives, Then it finds the model in the cache
    first = pool.infer(model="mlp", inputs=[[5.0, 3.4, 1.5, 0.2]], lease=lease(), timeout=30, batchable=True)
    assert first.cache_hit and first.load_s == 0.0


def test_a_prewarmed_executor_that_dies_idle_is_restarted(pool: ExecutorPool) -> None:
    # Given a prewarmed cpu executor
    pool.prewarm("cpu")
    lane = pool._lane("cpu")
    assert lane.executor is not None
    dead = lane.executor.pid
    # When it is killed while idle and the monitor's keep_warm runs
    os.kill(dead, signal.SIGKILL)
    lane.executor.process.wait()
    pool.keep_warm()
    # Then a new executor is started in the background, with no request needed
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (lane.executor and lane.executor.alive and lane.executor.pid != dead):
        time.sleep(0.1)
    assert lane.executor is not None and lane.executor.alive and lane.executor.pid != dead


def test_a_preload_that_cannot_load_is_skipped(pool: ExecutorPool) -> None:
    # Given a preload list naming a model the store lacks, When the lane is prewarmed
    loaded = pool.prewarm("cpu", [("no-such-model", None), ("mlp", None)])
    # Then the missing one is skipped (logged) and the others are loaded
    assert set(loaded) == {"mlp"}


def _generate_job(prompt: str) -> Generate:
    return Generate(model=TINY_LLAMA, prompts=[Prompt(prompt=prompt)],
                    params=GenerateParams(max_new_tokens=2).to_json(), progress_interval=60.0)


def test_a_prompt_that_reaches_the_executor_unchecked_is_refused_before_tokenizing_and_the_model_stays(
        pool: ExecutorPool) -> None:
    # Given a serving executor that holds the tiny Llama (a first generation loaded it)
    small = lease(memory=300 * 2**20)
    pool.generate(_generate_job("The cat"), lease=small, timeout=120)
    pid = pool._lane("cpu").executor.pid  # type: ignore[union-attr]
    # When a 4 MiB prompt and a lone surrogate reach it without the worker's validation
    with pytest.raises(InvalidInput, match="prompt is 4194304 bytes, above the 8192 bytes"):
        pool.generate(_generate_job("x" * 4 * 2**20), lease=small, timeout=120)
    with pytest.raises(InvalidInput, match="not valid Unicode: character 3"):
        pool.generate(_generate_job("The\ud800"), lease=small, timeout=120)
    # Then each failed alone: the same executor answers the next request from its cache
    after = pool.generate(_generate_job("The cat"), lease=small, timeout=120)
    assert after.cache_hit and pool._lane("cpu").executor.pid == pid  # type: ignore[union-attr]


def test_with_the_bound_lifted_what_the_tokenizer_does_fails_one_request_and_the_next_succeeds(store_dir: Path) -> None:
    # Given a pool whose operator lifted the text bound to 64 MiB
    pool = make_pool(store_dir, max_text_bytes=64 * 2**20)
    small = lease(memory=300 * 2**20)
    try:
        pool.generate(_generate_job("The cat"), lease=small, timeout=120)
        # When a 4 MiB prompt is tokenized under a 300 MiB reservation: the fast tokenizer panics (contained:
        # ExecutionError, the executor serves on) or its allocation fails and Rust aborts the process
        with pytest.raises((ExecutionError, ExecutorCrashed, MemoryLimitExceeded)):
            pool.generate(_generate_job("x" * 4 * 2**20), lease=small, timeout=120)
        # Then the next request on the pool still succeeds (on a restarted executor if it had to be)
        assert pool.generate(_generate_job("The cat"), lease=small, timeout=120).output.completion_tokens >= 1
    finally:
        pool.close()
