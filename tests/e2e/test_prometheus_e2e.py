"""A real Prometheus: the alert rules' unit tests (promtool), the deploy config's check, and a scrape of a worker.

promtool and prometheus come from Debian's `prometheus` package (`.ci/run` installs it when missing). Without
them the tests skip with that reason locally; in CI (`CI=true`) a missing binary is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from hypha_celery.harness.launch import free_port, wait_for
from tests.conftest import ROOT

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian's `prometheus` package provides it; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def test_every_alert_fires_on_its_series_and_only_then() -> None:
    # Given the alert rules and their unit tests (a firing case and a quiet case per alert)
    promtool = _binary("promtool")
    # When promtool evaluates them, Then every expectation holds
    run = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS_DIR, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_the_deploy_config_and_rules_check(tmp_path: Path) -> None:
    # Given the compose deployment's Prometheus config, its rule file path pointed at the repository's copy
    promtool = _binary("promtool")
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert "/etc/prometheus/alerts.yml" in config
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/alerts.yml",
                                                            str(PROMETHEUS_DIR / "alerts.yml")))
    # When promtool checks it (and through it the rules), Then both are valid
    run = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "8 rules found" in run.stdout + run.stderr


def test_a_real_prometheus_scrapes_a_worker_and_answers_a_query(start_worker, celery_client,
                                                               tmp_path: Path) -> None:
    prometheus = _binary("prometheus")
    # Given a worker serving metrics, which has completed three tasks
    metrics_port = free_port()
    start_worker({"monitoring": {"collect_metrics": True, "metrics_port": metrics_port, "monitor_interval": 0.5}})
    app = celery_client()
    for _ in range(3):
        app.send_task("hypha.noop", kwargs={"requirements": {"cpu_cores": 0.1}}).get(timeout=60)
    # ... and a Prometheus scraping it every second, with the deploy's alert rules loaded
    web_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{PROMETHEUS_DIR / 'alerts.yml'}']\n"
        "scrape_configs:\n"
        f"  - job_name: hypha-worker\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web_port}"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        def query(expr: str) -> list[dict]:
            url = f"http://127.0.0.1:{web_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return json.load(response)["data"]["result"]
            except OSError:
                return []

        # When it is asked for the completed-tasks counter, Then it has the worker's count of 3
        completed = wait_for(lambda: query('sum(hypha_worker_tasks_completed_total{task="hypha.noop"})') or None,
                             60, "Prometheus to scrape the worker")
        assert float(completed[0]["value"][1]) == 3.0
        up = query('up{job="hypha-worker"}')
        assert up and up[0]["value"][1] == "1"
        # ... and the rules loaded from the deploy's file are evaluated, none firing for a healthy worker
        rules = wait_for(lambda: query("ALERTS") == [] and query("up") and True, 10, "rule evaluation")
        assert rules
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
