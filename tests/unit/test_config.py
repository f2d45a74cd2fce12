"""The worker config: defaults, sizes, and every kind of bad config named by its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypha_celery.config import WorkerConfig, broker_urls, celery_settings, load_config, parse_config
from hypha_celery.errors import ConfigError
from hypha_celery.units import format_size, parse_size


def test_defaults_are_the_seed_example_values() -> None:
    # Given no file, When loading, Then every value is the seed's example
    cfg = load_config(None)
    assert cfg.max_concurrent_tasks == 4
    assert cfg.max_memory_per_task == 8 * 10**9
    assert cfg.max_cpu_cores_per_task == 4
    assert cfg.task_timeout == 300
    assert cfg.model_cache_size == 20 * 10**9
    assert cfg.network.advertisement_interval == 60
    assert cfg.models.model_dir == "/var/lib/hypha/models"
    assert cfg.execution.isolation_mode == "process"
    assert cfg.execution.sandbox_enabled is True
    assert cfg.execution.cpu_priority == "normal"
    assert cfg.execution.gpu_sharing is False
    assert cfg.monitoring.monitor_interval == 5
    assert cfg.monitoring.collect_metrics is True
    assert cfg.monitoring.metrics_port == 9091
    assert cfg.security.verify_task_signatures is True
    assert cfg.security.enforce_memory_limits is True
    assert cfg.security.enforce_cpu_limits is True


def test_seed_file_parses(tmp_path: Path) -> None:
    # Given the seed's two config examples merged (its placeholder multiaddr/peer ids replaced)
    path = tmp_path / "seed.toml"
    path.write_text("""
[worker]
max_concurrent_tasks = 4
max_memory_per_task = "8GB"
max_cpu_cores_per_task = 4
task_timeout = 300
model_cache_size = "20GB"
[worker.network]
gateway_addresses = ["redis://203.0.113.1:6379/0", "redis://203.0.113.2:6379/0"]
advertisement_interval = 60
[worker.models]
model_dir = "/var/lib/hypha/models"
[[worker.models.sources]]
type = "local"
path = "/var/lib/hypha/models"
[[worker.models.sources]]
type = "http"
url = "https://models.hypha.example.com"
[[worker.models.sources]]
type = "s3"
bucket = "hypha-models"
region = "us-east-1"
[worker.execution]
isolation_mode = "process"
sandbox_enabled = true
cpu_priority = "normal"
gpu_sharing = false
[worker.monitoring]
monitor_interval = 5
collect_metrics = true
metrics_port = 9091
[worker.security]
verify_task_signatures = true
allowed_schedulers = []
enforce_memory_limits = true
enforce_cpu_limits = true
""")
    # When loaded
    cfg = load_config(path)
    # Then sources keep their order and gateways become Celery's failover list
    assert [s.type for s in cfg.models.sources] == ["local", "http", "s3"]
    assert broker_urls(cfg, environ={}) == ["redis://203.0.113.1:6379/0", "redis://203.0.113.2:6379/0"]
    assert celery_settings(cfg, environ={})["broker_url"] == ["redis://203.0.113.1:6379/0", "redis://203.0.113.2:6379/0"]


@pytest.mark.parametrize(("text", "expected"), [
    ("8GB", 8 * 10**9), ("8G", 8 * 10**9), ("8 gb", 8 * 10**9), ("512MiB", 512 * 2**20), ("512Mi", 512 * 2**20),
    ("1.5GiB", 3 * 2**29), ("20GB", 20 * 10**9), (1048576, 1048576), ("100", 100), ("2TiB", 2 * 2**40),
])
def test_sizes_parse_decimal_and_binary_units(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "8XB", "-1GB", "0", 0, -5, "eight", True, [1]])
def test_bad_sizes_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size_keeps_the_unit_family() -> None:
    # Given sizes a person configured in whole units of either family
    # Then each reads back in its own unit, with a space
    assert format_size(512 * 2**20) == "512 MiB"
    assert format_size(3 * 10**9) == "3 GB"
    assert format_size(2 * 10**9) == "2 GB"  # not 1953125 KiB
    assert format_size(10) == "10 B"


@pytest.mark.parametrize(("size", "shown"), [
    (24683792 * 2**10, "23.5 GiB"),  # a machine's MemTotal: once printed as 24683792KiB
    (1536 * 2**20 + 1, "1.5 GiB"),
    (1536 * 2**20, "1.5 GiB"),  # exact in MiB, but 1536 of them is no human unit
    (1234567, "1.2 MiB"),
    (3 * 2**50, "3072.0 TiB"),
    (-(2**30), "-1 GiB"),
])
def test_format_size_prints_an_uneven_size_in_the_largest_binary_unit(size: int, shown: str) -> None:
    # When a size that is no whole number (below 1024) of any unit is printed
    # Then it is one decimal of the largest binary unit it reaches
    assert format_size(size) == shown


@pytest.mark.parametrize(("doc", "key", "words"), [
    ({"worker": {"max_concurent_tasks": 4}}, "worker.max_concurent_tasks", "did you mean 'max_concurrent_tasks'"),
    ({"worker": {"metrics_port": 9091}}, "worker.metrics_port", "belongs in [worker.monitoring]"),
    ({"worker": {"network": {"advertisment_interval": 5}}}, "worker.network.advertisment_interval", "did you mean"),
    ({"workers": {}}, "workers", "did you mean 'worker'"),
    ({"worker": {"max_concurrent_tasks": "four"}}, "worker.max_concurrent_tasks", "expected an integer"),
    ({"worker": {"max_concurrent_tasks": 0}}, "worker.max_concurrent_tasks", "at least 1"),
    ({"worker": {"task_timeout": -3}}, "worker.task_timeout", "positive"),
    ({"worker": {"max_memory_per_task": "-8GB"}}, "worker.max_memory_per_task", "positive"),
    ({"worker": {"max_memory_per_task": "0GB"}}, "worker.max_memory_per_task", "positive"),
    ({"worker": {"model_cache_size": "lots"}}, "worker.model_cache_size", "cannot parse size"),
    ({"worker": {"model_cache_size": "20QB"}}, "worker.model_cache_size", "unknown size unit"),
    ({"worker": {"execution": {"isolation_mode": "jail"}}}, "worker.execution.isolation_mode", "must be one of"),
    ({"worker": {"execution": {"sandbox_enabled": "yes"}}}, "worker.execution.sandbox_enabled", "true or false"),
    ({"worker": {"monitoring": {"metrics_port": 70000}}}, "worker.monitoring.metrics_port", "TCP port"),
    ({"worker": {"network": {"gateway_addresses": ["/ip4/203.0.113.1/tcp/4001/p2p/12D3KooW"]}}},
     "worker.network.gateway_addresses[0]", "libp2p multiaddr"),
    ({"worker": {"network": {"gateway_addresses": "redis://x"}}}, "worker.network.gateway_addresses", "array"),
    ({"worker": {"models": {"sources": [{"type": "ftp"}]}}}, "worker.models.sources[0].type", "must be one of"),
    ({"worker": {"models": {"sources": [{"type": "s3"}]}}}, "worker.models.sources[0].bucket", "required"),
    ({"worker": {"models": {"sources": [{"type": "http", "url": "ftp://x"}]}}}, "worker.models.sources[0].url", "http"),
    ({"worker": {"resources": {"gpus": [0, 0]}}}, "worker.resources.gpus", "twice"),
    ({"worker": {"admission": {"backoff_initial": 20.0, "backoff_max": 1.0}}}, "worker.admission.backoff_initial", "above"),
])
def test_bad_config_names_the_key(doc: dict, key: str, words: str) -> None:
    # Given a document with one mistake, When parsed, Then the error names the key and says why
    with pytest.raises(ConfigError) as caught:
        parse_config(doc)
    assert caught.value.key == key
    assert words in str(caught.value)


def test_celery_settings_derive_from_task_timeout() -> None:
    # Given a task_timeout, Then Celery's limits and the Redis visibility timeout sit above it
    cfg = parse_config({"worker": {"task_timeout": 120}})
    settings = celery_settings(cfg, environ={})
    assert 120 < settings["task_soft_time_limit"] < settings["task_time_limit"]
    assert settings["broker_transport_options"]["visibility_timeout"] > settings["task_time_limit"]
    assert settings["worker_concurrency"] == cfg.max_concurrent_tasks


def test_environment_overrides_the_file_for_brokers() -> None:
    cfg = parse_config({"worker": {"network": {"gateway_addresses": ["redis://a:6379/0"]}}})
    env = {"HYPHA_BROKER_URL": "amqp://guest:guest@b:5672//;amqp://guest:guest@c:5672//"}
    assert broker_urls(cfg, env) == ["amqp://guest:guest@b:5672//", "amqp://guest:guest@c:5672//"]
    assert celery_settings(cfg, {"HYPHA_BROKER_URL": "redis://d:6379/2"})["result_backend"] == "redis://d:6379/2"
    assert celery_settings(cfg, {"HYPHA_BROKER_URL": "amqp://x//"})["result_backend"] == "redis://127.0.0.1:6379/0"
    assert celery_settings(WorkerConfig(), {})["broker_url"] == "redis://127.0.0.1:6379/0"


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    # Given a path with no file, When loading it, Then a ConfigError says so
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_preload_names_model_ids_and_needs_prewarm() -> None:
    # Given preload lists, When parsed, Then a bad id or preload without prewarm names the key
    assert parse_config({"worker": {"models": {"preload": ["tiny-llama"]}}}).models.preload == ["tiny-llama"]
    with pytest.raises(ConfigError, match=r"worker\.models\.preload\[1\]"):
        parse_config({"worker": {"models": {"preload": ["ok", "../etc"]}}})
    with pytest.raises(ConfigError, match=r"worker\.models\.preload: needs worker\.execution\.prewarm"):
        parse_config({"worker": {"models": {"preload": ["ok"]}, "execution": {"prewarm": False}}})


def test_the_prefix_cache_takes_a_size_or_off_and_reaches_the_executor() -> None:
    from hypha_celery.worker.context import executor_settings

    # Given the default, a size and "off", When parsed, Then each is the bytes each serving engine keeps
    assert load_config(None).generation.prefix_cache == 64 * 2**20
    assert parse_config({"worker": {"generation": {"prefix_cache": "1GiB"}}}).generation.prefix_cache == 2**30
    off = parse_config({"worker": {"generation": {"prefix_cache": "off"}}})
    assert off.generation.prefix_cache == 0
    # And the executor is started with it
    assert executor_settings(off).prefix_cache_bytes == 0
    # And anything else is refused naming the key
    with pytest.raises(ConfigError, match=r"prefix_cache.*\(or \"off\"\)"):
        parse_config({"worker": {"generation": {"prefix_cache": "lots"}}})


@pytest.mark.parametrize(("value", "seconds"), [(None, 0.0), ("", 0.0), ("0.02", 0.02), ("10", 10.0), ("11", 0.0),
                                                ("-1", 0.0), ("soon", 0.0), ("nan", 0.0)])
def test_a_test_hooks_seconds_come_from_its_variable_and_a_bad_value_slows_nothing(
        monkeypatch: pytest.MonkeyPatch, value: str | None, seconds: float) -> None:
    from hypha_celery.units import env_seconds

    if value is None:
        monkeypatch.delenv("HYPHA_TEST_X_S", raising=False)
    else:
        monkeypatch.setenv("HYPHA_TEST_X_S", value)
    assert env_seconds("HYPHA_TEST_X_S", 10) == seconds
