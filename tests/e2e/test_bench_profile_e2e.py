"""``python -m bench.profile_noop``: hypha's no-op through Celery's own tracer, in process, on its own redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_profile_runs_each_task_through_the_worker_backend_and_prints_its_cpu() -> None:
    # Given a short profile (20 calls a run), When it runs
    env = {**os.environ, "HYPHA_PROFILE_CALLS": "20"}
    env.pop("HYPHA_REGISTRY_URL", None)
    done = subprocess.run([sys.executable, "-m", "bench.profile_noop"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    # Then it succeeds and prints the CPU per task of the three tasks, hypha's against the bare task's
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for label in ("hypha.noop", "celery.accumulate, hypha's backend", "a bare task, Celery's backend"):
        [line] = [line for line in lines if line.strip().startswith(label)]
        assert "x the bare task" in line
    # ... and the call tree is hypha's path through the worker's backend: the reservation rode with STARTED
    assert "run_task" in done.stdout and "ResultBackend.store_started" in done.stdout
