"""The operator files under deploy/: they parse and agree with each other.

That the dashboard and alerts name metrics the worker exports is checked in
``tests/e2e/test_deploy_metrics_e2e.py`` (it sets the metrics up in a subprocess).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from hypha_celery.config import WorkerConfig, load_config, parse_config
from hypha_celery.units import parse_size

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
WORKER_TOML = DEPLOY / "worker.toml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "hypha-worker.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "hypha.yml"
SYSTEMD_UNIT = DEPLOY / "systemd" / "hypha-worker.service"
SYSTEMD_ENV = DEPLOY / "systemd" / "worker.env.example"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"

# Metric names as celery-exporter (danihodovic/celery-exporter) documents them.
CELERY_EXPORTER_METRICS = {
    "celery_task_sent_total",
    "celery_task_received_total",
    "celery_task_started_total",
    "celery_task_succeeded_total",
    "celery_task_failed_total",
    "celery_task_rejected_total",
    "celery_task_revoked_total",
    "celery_task_retried_total",
    "celery_worker_up",
    "celery_worker_tasks_active",
    "celery_task_runtime_bucket",
    "celery_task_runtime_sum",
    "celery_task_runtime_count",
    "celery_queue_length",
    "celery_active_consumer_count",
    "celery_active_worker_count",
    "celery_active_process_count",
}

HYPHA_METRIC = re.compile(r"\bhypha_worker_[A-Za-z0-9_]+")
CELERY_METRIC = re.compile(r"\bcelery_[A-Za-z0-9_]+")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_k8s(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def k8s_object(name: str, kind: str) -> dict[str, Any]:
    matches = [doc for doc in load_k8s(name) if doc["kind"] == kind]
    assert len(matches) == 1, f"{name}: expected one {kind}, found {len(matches)}"
    return matches[0]


def worker_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "worker")


def configmap_worker_config() -> WorkerConfig:
    configmap = k8s_object("configmap.yaml", "ConfigMap")
    return parse_config(tomllib.loads(configmap["data"]["worker.toml"]))


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    exprs = [target["expr"] for panel in all_panels(dashboard) for target in panel.get("targets", []) if "expr" in target]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        exprs.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
        exprs.append(variable.get("definition", ""))
    return exprs


def alert_exprs(rules_file: dict[str, Any]) -> list[str]:
    return [str(rule["expr"]) for group in rules_file["groups"] for rule in group["rules"]]


def unknown_metrics(exprs: list[str], exported: set[str]) -> set[str]:
    """The ``hypha_worker_*`` names in ``exprs`` that the worker does not export."""
    return {name for expr in exprs for name in HYPHA_METRIC.findall(expr)} - exported


def panels_by_row(dashboard: dict[str, Any]) -> dict[str | None, list[dict[str, Any]]]:
    """Panels grouped under the row they sit in (None: above the first row)."""
    rows: dict[str | None, list[dict[str, Any]]] = {None: []}
    current: str | None = None
    ordered = sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    for panel in ordered:
        if panel["type"] == "row":
            current = panel["title"]
            rows.setdefault(current, []).extend(panel.get("panels", []))
        else:
            rows[current].append(panel)
    return rows


def panel_exprs(panel: dict[str, Any]) -> str:
    return " ".join(target.get("expr", "") for target in panel.get("targets", []))


def compose_default(value: str) -> str:
    """``${VAR:-default}`` as compose resolves it with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def duration_seconds(value: str | int) -> float:
    """A compose duration (``"6m"``, ``"1m30s"``, ``"90s"``) or systemd seconds, in seconds."""
    if isinstance(value, int) or str(value).isdigit():
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|s)", str(value))
    assert parts, f"not a duration: {value!r}"
    scale = {"h": 3600, "min": 60, "m": 60, "s": 1}
    return sum(float(number) * scale[unit] for number, unit in parts)


def systemd_directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values]}}`` of a unit file (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def cpu_quantity(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- every file parses


def test_every_yaml_file_under_deploy_parses() -> None:
    # Given every YAML file under deploy/
    files = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert len(files) >= 10, files
    # When each is parsed (all documents)
    failures = {}
    for path in files:
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            failures[str(path.relative_to(ROOT))] = str(exc)
            continue
        if not any(documents):
            failures[str(path.relative_to(ROOT))] = "no document"
    # Then none fails
    assert not failures, failures


def test_every_json_file_under_deploy_parses() -> None:
    # Given every JSON file under deploy/
    files = sorted(DEPLOY.rglob("*.json"))
    assert files
    # When each is parsed, Then none fails
    for path in files:
        assert isinstance(json.loads(path.read_text()), dict), path


# --- docker compose


def test_compose_defines_the_operator_services() -> None:
    # Given the compose file, When reading its services
    services = load_yaml(COMPOSE)["services"]
    # Then the whole stack is there
    assert {"redis", "worker", "flower", "celery-exporter", "prometheus", "grafana"} <= set(services)


def test_compose_rabbitmq_only_starts_with_its_profile() -> None:
    # Given the compose file, When reading the rabbitmq service
    rabbitmq = load_yaml(COMPOSE)["services"]["rabbitmq"]
    # Then it is behind the "rabbitmq" profile, and nothing else is
    assert rabbitmq["profiles"] == ["rabbitmq"]
    others = {name for name, service in load_yaml(COMPOSE)["services"].items() if service.get("profiles")}
    assert others == {"rabbitmq"}


def test_compose_worker_mounts_the_config_its_command_reads() -> None:
    # Given the worker service
    worker = load_yaml(COMPOSE)["services"]["worker"]
    # When finding the --hypha-config path in its command
    command = worker["command"]
    config_path = command[command.index("--hypha-config") + 1]
    # Then deploy/worker.toml is mounted exactly there
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in worker["volumes"]}
    assert mounts[config_path] == "./worker.toml"
    assert command[:4] == ["celery", "-A", "hypha_celery", "worker"]


def test_compose_worker_and_flower_use_the_compose_redis() -> None:
    # Given the worker and Flower services, When resolving their environment with nothing set
    services = load_yaml(COMPOSE)["services"]
    for name in ("worker", "flower"):
        env = {key: compose_default(str(value)) for key, value in services[name]["environment"].items()}
        # Then broker, results and registry are the compose Redis
        for key in ("HYPHA_BROKER_URL", "HYPHA_RESULT_BACKEND", "HYPHA_REGISTRY_URL"):
            assert env[key] == "redis://redis:6379/0", (name, key)
    exporter_env = services["celery-exporter"]["environment"]
    assert compose_default(exporter_env["CE_BROKER_URL"]) == "redis://redis:6379/0"


def test_compose_worker_stop_grace_exceeds_task_timeout() -> None:
    # Given the worker service and the config it mounts
    worker = load_yaml(COMPOSE)["services"]["worker"]
    task_timeout = load_config(WORKER_TOML).task_timeout
    # When reading how long Docker waits after SIGTERM
    grace = duration_seconds(worker["stop_grace_period"])
    # Then running tasks may finish (task_timeout plus the 3 s kill grace)
    assert grace > task_timeout + 3


def test_compose_flower_serves_on_5555() -> None:
    # Given the flower service
    flower = load_yaml(COMPOSE)["services"]["flower"]
    # Then it runs Flower on 5555 and publishes it
    assert "flower" in flower["command"] and "--port=5555" in flower["command"]
    assert any(str(port).endswith("5555:5555") for port in flower["ports"])


# --- prometheus


def test_prometheus_scrapes_the_worker_and_celery_exporter() -> None:
    # Given the Prometheus config, When collecting its static targets
    config = load_yaml(PROMETHEUS)
    targets = {target for job in config["scrape_configs"] for static in job.get("static_configs", [])
               for target in static["targets"]}
    # Then the worker's metrics port and celery-exporter's are both scraped, by compose service name
    assert "worker:9091" in targets
    assert "celery-exporter:9808" in targets
    services = load_yaml(COMPOSE)["services"]
    assert {"worker", "celery-exporter"} <= set(services)


def test_prometheus_loads_the_alert_rules_compose_mounts() -> None:
    # Given the Prometheus config and the prometheus service's mounts
    rule_files = load_yaml(PROMETHEUS)["rule_files"]
    volumes = load_yaml(COMPOSE)["services"]["prometheus"]["volumes"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in volumes}
    # Then every rule file it loads is a file of deploy/prometheus/ mounted there
    for path in rule_files:
        assert path in mounted, path
        assert (DEPLOY / mounted[path]).resolve() == ALERTS.resolve()


def test_alert_rules_have_a_name_an_expression_and_a_severity() -> None:
    # Given the alert rules
    groups = load_yaml(ALERTS)["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules
    # Then each is an alert with an expression and a severity label
    for rule in rules:
        assert rule.get("alert") and rule.get("expr"), rule
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule


# --- worker config


def test_worker_toml_loads() -> None:
    # Given deploy/worker.toml, When loading it as the worker does
    cfg = load_config(WORKER_TOML)
    # Then it is valid, and sized as documented
    assert cfg.task_timeout == 300
    assert cfg.monitoring.metrics_port == 9091
    assert cfg.monitoring.collect_metrics is True


def test_worker_toml_mentions_every_config_key() -> None:
    # Given every key the worker config declares
    defaults = WorkerConfig()
    keys = {f.name for f in dataclasses.fields(WorkerConfig) if "kind" in f.metadata}
    for f in dataclasses.fields(WorkerConfig):
        section = getattr(defaults, f.name)
        if dataclasses.is_dataclass(section):
            keys |= {g.name for g in dataclasses.fields(section)}
    assert "lease_heartbeat" in keys and "max_batch_size" in keys
    # When looking for each in the example file (set, or shown in a comment)
    text = WORKER_TOML.read_text()
    missing = {key for key in keys if not re.search(rf"(^|[\s#.\[]){key}(\s*=|\]\])", text, re.MULTILINE)}
    # Then the example is complete
    assert not missing, missing


# --- dashboard and alerts use real metric names (checked against the worker in tests/e2e)


def test_metric_check_flags_an_unknown_name() -> None:
    # Given an expression that names a metric the worker does not export
    exprs = ["sum(rate(hypha_worker_tasks_completed_total[5m])) + hypha_worker_nonexistent"]
    # When checking it against what the worker exports, Then exactly that name is reported
    assert unknown_metrics(exprs, {"hypha_worker_tasks_completed_total"}) == {"hypha_worker_nonexistent"}


def test_dashboard_celery_metrics_are_celery_exporter_names() -> None:
    # Given the dashboard's PromQL, When collecting its celery_* names
    names = {name for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())) for name in CELERY_METRIC.findall(expr)}
    # Then it uses the exporter's documented names, among them the task and worker counts
    assert names
    assert names <= CELERY_EXPORTER_METRICS, names - CELERY_EXPORTER_METRICS
    assert {"celery_task_succeeded_total", "celery_task_failed_total", "celery_worker_up"} <= names


def test_dashboard_exporter_panels_sit_in_the_celery_exporter_row() -> None:
    # Given the dashboard's panels grouped by row
    rows = panels_by_row(json.loads(DASHBOARD.read_text()))
    exporter_row = rows["celery-exporter"]
    # Then every celery_* panel is in the "celery-exporter" row, and that row holds no worker panel
    assert exporter_row
    for title, panels in rows.items():
        for panel in panels:
            uses_exporter = bool(CELERY_METRIC.search(panel_exprs(panel)))
            assert uses_exporter == (title == "celery-exporter"), (title, panel["title"])


def test_dashboard_queries_the_provisioned_datasource() -> None:
    # Given the provisioned datasource and the dashboard
    datasource = load_yaml(DATASOURCES)["datasources"][0]
    dashboard = json.loads(DASHBOARD.read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    # Then the datasource variable defaults to it, and every panel and target queries through the variable
    assert variable["current"]["value"] == datasource["uid"]
    assert variable["query"] == datasource["type"]
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == f"${{{variable['name']}}}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == f"${{{variable['name']}}}", panel["title"]


def test_dashboard_panel_ids_are_unique() -> None:
    # Given the dashboard, When listing panel ids
    ids = [panel["id"] for panel in all_panels(json.loads(DASHBOARD.read_text()))]
    # Then no two panels share one
    assert len(ids) == len(set(ids))


def test_grafana_loads_dashboards_from_where_compose_mounts_them() -> None:
    # Given the dashboard provider and the grafana service's mounts
    provider = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]
    volumes = load_yaml(COMPOSE)["services"]["grafana"]["volumes"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in volumes}
    # Then the provider's path is deploy/grafana/dashboards, which holds the dashboard
    assert provider["type"] == "file"
    source = DEPLOY / mounted[provider["options"]["path"]]
    assert (source / DASHBOARD.name).resolve() == DASHBOARD.resolve()


# --- kubernetes


def test_k8s_worker_requests_a_gpu() -> None:
    # Given the worker Deployment
    container = worker_container(k8s_object("worker-deployment.yaml", "Deployment"))
    # Then its container requests and is limited to one nvidia.com/gpu
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == 1


def test_k8s_grace_period_exceeds_task_timeout() -> None:
    # Given the Deployment and the ConfigMap's task_timeout
    deployment = k8s_object("worker-deployment.yaml", "Deployment")
    task_timeout = configmap_worker_config().task_timeout
    # Then the kubelet waits past task_timeout (plus the 3 s kill grace) before SIGKILL
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > task_timeout + 3


def test_k8s_configmap_holds_a_valid_worker_config() -> None:
    # Given the ConfigMap's worker.toml, When validating it as the worker does
    cfg = configmap_worker_config()
    # Then it parses, and keeps the container's network namespace as the sandbox
    assert cfg.execution.sandbox_enabled is False
    assert cfg.monitoring.metrics_port == 9091


def test_k8s_advertised_resources_fit_the_container_limits() -> None:
    # Given the ConfigMap's [worker.resources] and the container's limits
    cfg = configmap_worker_config()
    limits = worker_container(k8s_object("worker-deployment.yaml", "Deployment"))["resources"]["limits"]
    # Then the node offers no more than the pod may use (detection would see the whole node)
    assert cfg.resources.cpu_cores is not None and cfg.resources.memory is not None
    assert cfg.resources.cpu_cores <= cpu_quantity(limits["cpu"])
    assert cfg.resources.memory < parse_size(limits["memory"])


def test_k8s_worker_mounts_the_configmap_where_it_reads_its_config() -> None:
    # Given the Deployment's worker container and pod volumes
    deployment = k8s_object("worker-deployment.yaml", "Deployment")
    container = worker_container(deployment)
    command = container["command"]
    config_path = Path(command[command.index("--hypha-config") + 1])
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    # Then the directory of that path is the ConfigMap, which has the file
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    configmap_name = volumes[mount["name"]]["configMap"]["name"]
    configmap = k8s_object("configmap.yaml", "ConfigMap")
    assert configmap["metadata"]["name"] == configmap_name
    assert config_path.name in configmap["data"]


def test_k8s_worker_env_comes_from_the_secret() -> None:
    # Given the Deployment and the Secret
    container = worker_container(k8s_object("worker-deployment.yaml", "Deployment"))
    secret = k8s_object("worker-secret.yaml", "Secret")
    # Then the worker takes its broker, results and registry URLs from the Secret
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    assert {"HYPHA_BROKER_URL", "HYPHA_RESULT_BACKEND", "HYPHA_REGISTRY_URL"} <= set(secret["stringData"])


def test_k8s_readiness_probe_pings_this_worker() -> None:
    # Given the worker container's readiness probe
    probe = worker_container(k8s_object("worker-deployment.yaml", "Deployment"))["readinessProbe"]
    command = " ".join(probe["exec"]["command"])
    # Then it pings this pod's worker by its node name through Celery
    assert "celery -A hypha_celery inspect ping" in command
    assert re.search(r"-d \"?celery@\$\{?HOSTNAME", command)


def test_k8s_metrics_are_scraped_on_the_metrics_port() -> None:
    # Given the Deployment, the metrics Service and the ConfigMap's metrics_port
    deployment = k8s_object("worker-deployment.yaml", "Deployment")
    service = k8s_object("metrics-service.yaml", "Service")
    port = configmap_worker_config().monitoring.metrics_port
    template = deployment["spec"]["template"]
    # Then the pod annotations, the container port and the Service all say that port
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    container_ports = {p["name"]: p["containerPort"] for p in worker_container(deployment)["ports"]}
    assert container_ports["metrics"] == port
    assert service["spec"]["ports"][0]["port"] == port
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()


def test_k8s_kustomization_lists_every_manifest() -> None:
    # Given deploy/k8s's kustomization
    resources = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    # Then it applies every manifest beside it
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert resources == manifests


# --- systemd


def test_systemd_unit_does_not_restart_on_config_error() -> None:
    # Given the unit's [Service] section
    service = systemd_directives(SYSTEMD_UNIT)["Service"]
    # Then a crash restarts it, and the config-error exit status (78) does not
    assert service["Restart"] == ["on-failure"]
    assert "78" in service["RestartPreventExitStatus"][0].split()


def test_systemd_stop_timeout_exceeds_task_timeout() -> None:
    # Given the unit and the example config it is installed with
    service = systemd_directives(SYSTEMD_UNIT)["Service"]
    task_timeout = load_config(WORKER_TOML).task_timeout
    # Then SIGTERM (warm shutdown) goes to the worker only, and SIGKILL waits past task_timeout
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]
    assert duration_seconds(service["TimeoutStopSec"][0]) > task_timeout + 3


def test_systemd_unit_runs_the_worker_as_hypha_with_etc_config() -> None:
    # Given the unit's [Service] section
    service = systemd_directives(SYSTEMD_UNIT)["Service"]
    # Then it runs celery's worker as hypha, with /etc/hypha's config and environment
    assert service["User"] == ["hypha"]
    assert service["EnvironmentFile"] == ["/etc/hypha/worker.env"]
    exec_start = service["ExecStart"][0].split()
    assert exec_start[0].endswith("/celery") and exec_start[1:4] == ["-A", "hypha_celery", "worker"]
    assert exec_start[exec_start.index("--hypha-config") + 1] == "/etc/hypha/worker.toml"


def test_systemd_env_example_sets_the_worker_urls() -> None:
    # Given the example environment file, When reading its assignments
    assignments = dict(
        line.split("=", 1) for line in SYSTEMD_ENV.read_text().splitlines() if line and not line.startswith("#")
    )
    # Then broker, result backend and registry are set
    assert {"HYPHA_BROKER_URL", "HYPHA_RESULT_BACKEND", "HYPHA_REGISTRY_URL"} <= set(assignments)


# --- image


def test_dockerfile_pins_cpu_torch_and_runs_unprivileged() -> None:
    # Given the Dockerfile
    text = DOCKERFILE.read_text()
    # Then torch 2.13.0 comes from the CPU index by default, the examples are built in, and it runs as hypha
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "hypha-celery models init-examples /var/lib/hypha/models" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] == "hypha"
