"""``python -m hypha_celery.harness.gpu_check`` as a person runs it: no GPU, and the CPU rehearsal of its steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def gpu_check(*args: str, pythonpath: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, "-m", "hypha_celery.harness.gpu_check", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    # Given an interpreter where NVML cannot load (a pynvml that fails to import comes first on the path)
    (tmp_path / "pynvml.py").write_text('raise ImportError("no NVML on this machine")\n')
    # When the check runs
    done = gpu_check(pythonpath=str(tmp_path))
    # Then it prints the reason on one line and exits 0
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "1. no NVIDIA GPU found by NVML (nvidia-ml-py is not installed: pip install nvidia-ml-py): nothing to check"
    ]


def test_the_cpu_rehearsal_runs_every_step_through_a_real_worker() -> None:
    # Given any machine, When the check rehearses its steps on the CPU
    done = gpu_check("--cpu", "--concurrent", "2", "--max-new-tokens", "16", timeout=240)
    out = done.stdout
    # Then a worker registered, the generation ran on the CPU in fp32 while the ledger held its lease,
    # the concurrent requests were answered, and it passed
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"worker \S+ registered", out)
    assert "PASS: cpu, float32" in out
    held = re.search(r"the ledger held its lease in (\d+) samples", out)
    assert held and int(held.group(1)) > 0
    assert re.search(r"2 at once: \d+ tokens in", out)
    assert out.splitlines()[-1].startswith("PASS (")


def test_a_gpu_with_a_cpu_build_of_torch_cannot_be_checked() -> None:
    import torch

    if torch.version.cuda:
        pytest.skip(f"torch {torch.__version__} is a CUDA build: `make gpu-check` runs the real check")
    # Given NVML reporting an H200 (the fake NVML) and this interpreter's CPU build of torch
    done = gpu_check(pythonpath=str(ROOT / "tests" / "fake_nvml"), timeout=180)
    # Then it lists the GPU, names the CPU build, and exits 2 without starting anything
    assert done.returncode == 2, done.stdout + done.stderr
    assert "GPU 0: NVIDIA H200, 140.4 GiB, compute capability 9.0" in done.stdout
    assert f"torch {torch.__version__} is a CPU build" in done.stdout
    assert "2. " not in done.stdout
