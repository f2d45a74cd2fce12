"""``make gpu-check`` without a GPU: the no-NVML answer, NVML's memory per process, reservation against use."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import fakeredis
import pytest

from hypha_celery.harness import gpu_check
from hypha_celery.harness.gpu_memory import NvmlMemory, Sample, Sampler, compare
from hypha_celery.resources import gpu
from hypha_celery.resources.ledger import Capacity, Ledger
from hypha_celery.resources.requirements import Requirements

FAKE_NVML = Path(__file__).parents[1] / "fake_nvml" / "pynvml.py"
NO_SUCH_PID = 4_194_304 + 17  # above Linux's largest pid_max: a pid NVML may report from another namespace
GiB, MiB = 2**30, 2**20


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py does not import
    monkeypatch.setattr(gpu, "_initialised", False)
    monkeypatch.setattr(gpu, "_absent", False)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setenv("FAKE_NVML_GPUS", "1")
    return module


def test_without_nvml_it_says_so_and_exits_0(no_nvml: None, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a machine where NVML cannot be loaded, When the check runs
    status = gpu_check.main([])
    # Then it prints one line with the reason, starts nothing, and exits 0
    assert status == 0
    assert capsys.readouterr().out.splitlines() == [
        "1. no NVIDIA GPU found by NVML (nvidia-ml-py is not installed: pip install nvidia-ml-py): nothing to check"
    ]


def test_the_worker_s_processes_are_counted_one_by_one(fake_nvml: ModuleType) -> None:
    # Given NVML lists this process (its group stands for the worker's) and a pid of no group here
    fake_nvml.processes = {0: [(os.getpid(), 600 * MiB), (NO_SUCH_PID, 5 * GiB)]}
    fake_nvml.used = {0: 7 * GiB}
    memory = NvmlMemory([0])
    memory.group = os.getpgid(0)
    # When it reads what the worker uses
    seen = memory.read()
    # Then only the worker's process counts, per process
    assert seen == {0: (600 * MiB, NvmlMemory.PER_PROCESS, [os.getpid()])}


def test_without_per_process_figures_it_counts_the_device_above_its_baseline(fake_nvml: ModuleType) -> None:
    # Given 1 GiB in use before the worker, and NVML listing the worker's process without its memory
    fake_nvml.used = {0: GiB}
    memory = NvmlMemory([0])
    memory.group = os.getpgid(0)
    fake_nvml.used = {0: GiB + 700 * MiB}
    fake_nvml.processes = {0: [(os.getpid(), None)]}
    # When it reads what the worker uses
    seen = memory.read()
    # Then it is the device's use above the baseline, and it says why
    assert seen == {0: (700 * MiB, NvmlMemory.DEVICE, [])}
    assert "without their memory" in memory.why_not_per_process


def test_a_sample_reads_task_leases_and_the_model_cache_per_gpu(fake_redis: fakeredis.FakeRedis) -> None:
    # Given a node with one GPU, a task's lease of 1 GiB on it and a model cache of 5 MiB accounted there
    ledger = Ledger(fake_redis, "gpu-node")
    ledger.set_capacity(Capacity(cores=[0, 1], memory=8 * GiB, gpus={0: 80 * GiB}, gpu_sharing=True))
    ledger.reserve(Requirements.parse({"cpu_cores": 0.5, "memory": "64MiB", "gpus": 1, "gpu_memory": "1GiB"}),
                   holder="w/task-1", task_id="task-1")
    ledger.account("cache-cuda0", gpus={0: 5 * MiB}, holder="w")
    # When the sampler looks
    sample = Sampler(ledger, None).sample()
    # Then it sees the task by id, its GPU bytes and the cache's apart
    assert sample.tasks == {"task-1"}
    assert (sample.task_reserved, sample.cache_reserved, sample.reserved(0)) == ({0: GiB}, {0: 5 * MiB}, GiB + 5 * MiB)


def _sample(task_reserved: dict[int, int], in_use: int, cache: int = 0) -> Sample:
    return Sample(at=0.0, tasks=frozenset({"t"} if task_reserved else ()), task_reserved=task_reserved,
                  cache_reserved={0: cache} if cache else {}, in_use={0: in_use},
                  method={0: NvmlMemory.PER_PROCESS}, pids={0: [42]})


def test_use_above_the_reservation_at_one_moment_fails() -> None:
    # Given samples while the task held 1000 bytes (+200 cache), one of them seeing 1300 in use
    samples = [_sample({0: 1000}, 1100, cache=200), _sample({0: 1000}, 1300, cache=200)]
    # When they are compared
    result = compare(samples, 0)
    # Then the excess is caught with both numbers, and the peak is reported with the reservation of its moment
    assert result.exceeded and result.over == [(1300, 1200)]
    assert (result.samples, result.peak_in_use, result.task_reserved, result.cache_reserved) == (2, 1300, 1000, 200)


def test_the_peak_is_set_against_the_reservation_of_its_own_moment() -> None:
    # Given a lease that grew from 100 to 3000 bytes, the peak of 900 seen while it held 3000
    samples = [_sample({0: 100}, 90), _sample({0: 3000}, 900)]
    # When they are compared
    result = compare(samples, 0)
    # Then the peak is paired with 3000, and the worst moment is the first (0.9 of 100)
    assert (result.peak_in_use, result.task_reserved) == (900, 3000)
    assert result.worst_ratio == pytest.approx(0.9) and not result.exceeded


def test_use_within_the_reservation_passes_and_samples_without_a_lease_do_not_count() -> None:
    # Given a sample within the reservation, and one (after the lease was released) with more in use
    samples = [_sample({0: 1000}, 900), _sample({}, 5000)]
    # When they are compared
    result = compare(samples, 0)
    # Then only the leased moment counts, and it is within
    assert not result.exceeded and result.samples == 1 and result.worst_ratio == pytest.approx(0.9)
