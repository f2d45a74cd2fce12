"""The dashboard and alert rules name metrics the worker really exports.

The exported names come from :mod:`hypha_celery.monitoring.metrics` itself, set
up in a subprocess so this process's Prometheus state stays untouched; the
deploy files are read with the helpers of ``tests/unit/test_deploy.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.unit.test_deploy import (
    ALERTS,
    DASHBOARD,
    HYPHA_METRIC,
    ROOT,
    alert_exprs,
    dashboard_exprs,
    load_yaml,
    unknown_metrics,
)

# Run in a subprocess: set the worker's metrics up and print the sample names
# Prometheus would scrape (a counter x is exposed as x_total, a histogram as
# x_bucket, x_sum and x_count, a gauge as x).
_EXPORTED_NAMES = """
import json, sys
from hypha_celery.monitoring.metrics import PrometheusMetrics, prepare_multiprocess_dir
from prometheus_client.metrics import MetricWrapperBase
metrics = PrometheusMetrics(*prepare_multiprocess_dir(sys.argv[1]))
suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"], "summary": ["", "_sum", "_count"]}
names = set()
for metric in vars(metrics).values():
    if isinstance(metric, MetricWrapperBase):
        for family in metric.describe():
            names.update(family.name + suffix for suffix in suffixes[family.type])
print(json.dumps(sorted(names)))
"""


@pytest.fixture(scope="module")
def exported_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    directory = tmp_path_factory.mktemp("prometheus-multiproc")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    result = subprocess.run([sys.executable, "-c", _EXPORTED_NAMES, str(directory)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_exported_names_carry_the_exposition_suffixes(exported_names: set[str]) -> None:
    # Given the names derived from the worker's metrics
    # Then counters end in _total, histograms expose _bucket/_sum/_count, gauges their own name
    assert "hypha_worker_tasks_completed_total" in exported_names
    assert "hypha_worker_tasks_completed" not in exported_names
    assert {"hypha_worker_task_duration_seconds_bucket", "hypha_worker_task_duration_seconds_sum",
            "hypha_worker_task_duration_seconds_count"} <= exported_names
    assert "hypha_worker_tasks_active" in exported_names


def test_dashboard_hypha_metrics_are_exported(exported_names: set[str]) -> None:
    # Given the dashboard's PromQL
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert any("hypha_worker_" in expr for expr in exprs)
    # When checking every hypha_worker_* name, Then the worker exports each
    assert unknown_metrics(exprs, exported_names) == set()


def test_alert_hypha_metrics_are_exported(exported_names: set[str]) -> None:
    # Given the alert rules' expressions
    exprs = alert_exprs(load_yaml(ALERTS))
    assert any("hypha_worker_" in expr for expr in exprs)
    # When checking every hypha_worker_* name, Then the worker exports each
    assert unknown_metrics(exprs, exported_names) == set()


def test_dashboard_shows_every_worker_metric(exported_names: set[str]) -> None:
    # Given the worker's metric families (a name and its exposition suffixes)
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exported_names}
    # When collecting the families the dashboard uses
    used = {re.sub(r"_(total|bucket|sum|count)$", "", name)
            for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())) for name in HYPHA_METRIC.findall(expr)}
    # Then each has a panel
    assert families - used == set()
