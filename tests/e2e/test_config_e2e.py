"""A real ``celery worker`` refuses a bad config: exit status 78 (EX_CONFIG) and one line naming the key."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _worker_with(tmp_path: Path, text: str, *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "hypha_celery", "worker", "--hypha-config", str(path), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HYPHA_BROKER_URL": "redis://127.0.0.1:1/0"},
    )


@pytest.mark.parametrize(("text", "key"), [
    ("[worker]\nmax_concurent_tasks = 4\n", "worker.max_concurent_tasks"),
    ("[worker]\ntask_timeout = \"soon\"\n", "worker.task_timeout"),
    ("[worker]\nmax_memory_per_task = \"-1GB\"\n", "worker.max_memory_per_task"),
    ("[worker]\nmodel_cache_size = \"0B\"\n", "worker.model_cache_size"),
    ("[worker]\nmodel_cache_size = \"twenty gigs\"\n", "worker.model_cache_size"),
    ("[worker.execution]\nisolation_mode = \"chroot\"\n", "worker.execution.isolation_mode"),
    ("[worker.execution]\nisolation_mode = \"container\"\n", "worker.execution.isolation_mode"),
    ("[worker.execution]\nisolation_mode = \"vm\"\n", "worker.execution.isolation_mode"),
    ("[worker.resources]\ngpus = [0]\n", "worker.resources.gpus"),
    ("[worker.resources]\nmemory = \"64TB\"\nnode_id = \"x\"\n", "worker.resources.memory"),
    ("[worker.security]\nidentity_key = \"/nonexistent/worker.key\"\n", "worker.security.identity_key"),
    ("[worker\n", "config"),
])
def test_worker_refuses_bad_config_with_one_line(tmp_path: Path, text: str, key: str) -> None:
    # Given a bad config file, When a real worker starts with it
    models = f"[worker.models]\nmodel_dir = \"{tmp_path / 'models'}\"\n" if "[worker.models]" not in text else ""
    result = _worker_with(tmp_path, text + ("\n" + models if not text.startswith("[worker\n") else ""))
    # Then it exits with EX_CONFIG and one line naming the key, and no traceback
    assert result.returncode == 78, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert key in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_worker_refuses_a_metrics_port_in_use(tmp_path: Path) -> None:
    # Given something already listening on the metrics port
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = f"[worker.monitoring]\nmetrics_port = {port}\n[worker.models]\nmodel_dir = \"{tmp_path}\"\n"
        result = _worker_with(tmp_path, text)
    # Then the worker refuses to start and names the key
    assert result.returncode == 78
    assert "worker.monitoring.metrics_port" in result.stderr and "in use" in result.stderr
