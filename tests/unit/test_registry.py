"""Capability detection and the registry's record encoding (fakeredis: pure logic)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import fakeredis
import pytest

from hypha_celery import keys, registry
from hypha_celery.config import parse_config
from hypha_celery.errors import ConfigError, RegistryUnavailable
from hypha_celery.registry.record import PEERS_KEPT_S
from hypha_celery.resources import gpu
from hypha_celery.resources.capabilities import detect_capabilities, node_capacity

FAKE_NVML = Path(__file__).parents[1] / "fake_nvml" / "pynvml.py"


@pytest.fixture
def two_h200(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setattr(gpu, "_initialised", False)
    monkeypatch.setattr(gpu, "_absent", False)


def test_gpus_come_from_nvml(two_h200: None) -> None:
    gpus = gpu.list_gpus()
    assert [(g.index, g.model, g.memory, g.compute_capability) for g in gpus] == [
        (0, "NVIDIA H200", 150_754_820_096, "9.0"), (1, "NVIDIA H200", 150_754_820_096, "9.0")]
    assert gpus[1].uuid.startswith("GPU-") and gpu.gpu_utilization() == {0: 0.25, 1: 0.35}


def test_no_nvml_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(gpu, "_initialised", False)
    monkeypatch.setattr(gpu, "_absent", False)
    assert gpu.list_gpus() == [] and gpu.gpu_utilization() == {}


def test_capabilities_have_the_seed_fields(two_h200: None) -> None:
    cfg = parse_config({"worker": {"max_concurrent_tasks": 3, "resources": {"gpus": [1]}}})
    caps = detect_capabilities(cfg, ["mlp"], {"mlp": 0.01})
    data = caps.to_json()
    assert set(data) == {"cpu_cores", "total_memory", "available_memory", "gpus", "models",
                         "max_concurrent_tasks", "avg_inference_time"}
    assert [g["index"] for g in data["gpus"]] == [1] and data["max_concurrent_tasks"] == 3
    assert 0 < data["available_memory"] <= data["total_memory"]
    assert node_capacity(cfg).gpus == {1: 150_754_820_096}


def test_a_gpu_the_machine_lacks_is_refused(two_h200: None) -> None:
    with pytest.raises(ConfigError, match=r"worker.resources.gpus: GPU\(s\) \[5\] not found"):
        node_capacity(parse_config({"worker": {"resources": {"gpus": [0, 5]}}}))


def _record(worker_id: str = "celery@a") -> registry.WorkerRecord:
    return registry.WorkerRecord(worker_id=worker_id, node_id="a", queue=keys.worker_queue(worker_id),
                                 max_memory_per_task=10, max_cpu_cores_per_task=1, gpu_sharing=False,
                                 verify_task_signatures=True, started_at=time.time())


def test_record_round_trips_with_numbers_and_json(two_h200: None) -> None:
    client = fakeredis.FakeRedis()
    caps = detect_capabilities(parse_config({}), ["mlp", "cnn"])
    registry.register(client, _record(), caps, None, ttl=30)
    raw = client.hgetall(keys.worker("celery@a"))
    assert raw[b"cpu_cores"].isdigit() and raw[b"models"] == b'["mlp", "cnn"]'
    assert 0 < client.ttl(keys.worker("celery@a")) <= 30
    [worker] = registry.list_workers(client, live_usage=False)
    assert worker["queue"] == "hypha.worker.celery@a" and worker["gpus"][0]["model"] == "NVIDIA H200"
    assert worker["models"] == ["mlp", "cnn"] and isinstance(worker["last_updated"], float)


def test_a_new_record_carries_empty_inference_times() -> None:
    # Given a worker that has timed no task yet
    client = fakeredis.FakeRedis()
    caps = detect_capabilities(parse_config({}), ["mlp"])
    # When it registers for the first time
    registry.register(client, _record(), caps, None, ttl=30)
    # Then the hash that other programs read already has the field, as an empty JSON object
    assert client.hget(keys.worker("celery@a"), "avg_inference_time") == b"{}"


def test_a_registry_outage_is_registry_unavailable() -> None:
    # Given a Redis that is down
    server = fakeredis.FakeServer()
    server.connected = False
    client = fakeredis.FakeRedis(server=server)
    times = registry.InferenceTimes()
    times.observe("mlp", 1.0)
    # When the registry is read, or task timings are flushed, Then RegistryUnavailable is raised
    with pytest.raises(RegistryUnavailable, match="registry Redis unreachable"):
        registry.list_workers(client)
    with pytest.raises(RegistryUnavailable):
        times.flush(client, "celery@a")


def test_a_failed_refresh_republishes_everything_at_the_next() -> None:
    # Given a worker that has published its models once
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    caps = detect_capabilities(parse_config({}), ["mlp"])
    published = registry.Published()
    registry.register(client, _record(), caps, None, ttl=30, published=published)
    assert published.version is not None
    # When a refresh fails (Redis down: whether it landed is unknown)
    server.connected = False
    with pytest.raises(RegistryUnavailable):
        registry.register(client, _record(), caps, None, ttl=30, published=published)
    # Then the worker forgets what it published, and the next refresh writes it all again
    assert published.version is None and published.indexes == frozenset()
    server.connected = True
    client.delete(keys.KeySchema().model_workers("mlp", "stored"))
    registry.register(client, _record(), caps, None, ttl=30, published=published)
    assert client.zscore(keys.KeySchema().model_workers("mlp", "stored"), "celery@a") is not None


def test_moving_average_is_kept_across_refreshes() -> None:
    client = fakeredis.FakeRedis()
    caps = detect_capabilities(parse_config({}), [])
    registry.register(client, _record(), caps, None, ttl=30)
    times = registry.InferenceTimes(every=3600)
    times.observe("mlp", 1.0)
    times.flush(client, "celery@a")
    times.observe("mlp", 2.0)
    times.flush(client, "celery@a")  # within `every`: nothing written yet
    assert registry.decode_record(client.hgetall(keys.worker("celery@a")))["avg_inference_time"] == {"mlp": 1.0}
    times.flush(client, "celery@a", force=True)
    registry.register(client, _record(), caps, None, ttl=30)
    [worker] = registry.list_workers(client, live_usage=False)
    assert worker["avg_inference_time"]["mlp"] == pytest.approx(1.2)


def test_readers_prune_expired_workers() -> None:
    client = fakeredis.FakeRedis()
    caps = detect_capabilities(parse_config({}), [])
    registry.register(client, _record("celery@gone"), caps, None, ttl=1)
    registry.register(client, _record("celery@alive"), caps, None, ttl=60)
    client.delete(keys.worker("celery@gone"))  # its TTL ran out
    assert registry.prune(client, now=time.time() + 2) == ["celery@gone"]
    assert [w["worker_id"] for w in registry.list_workers(client, live_usage=False)] == ["celery@alive"]
    assert client.zscore(keys.workers(), "celery@gone") is None


def test_memory_capacity_respects_a_cgroup_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given a process whose cgroup (v2) allows 2 GiB on a bigger machine
    import builtins

    from hypha_celery.resources import capabilities

    limit = tmp_path / "memory.max"
    limit.write_text(str(2 * 2**30))
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if file == "/proc/self/cgroup":
            cgroup = tmp_path / "cgroup"
            cgroup.write_text("0::/job\n")
            return real_open(cgroup, *args, **kwargs)
        if file == "/sys/fs/cgroup/job/memory.max":
            return real_open(limit, *args, **kwargs)
        if str(file).startswith("/sys/fs/cgroup"):
            raise FileNotFoundError(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    # Then the node offers the cgroup's limit, not the machine's memory
    assert capabilities.memory_limit() == min(2 * 2**30, capabilities.psutil.virtual_memory().total)


def test_a_workers_identity_stays_known_after_its_record_expires() -> None:
    # Given a worker that registered with an identity, and one without
    client = fakeredis.FakeRedis()
    caps = detect_capabilities(parse_config({}), [])
    registry.register(client, dataclasses.replace(_record("celery@signer"), peer_id="12D3KooWpeer"), caps, None, ttl=1)
    registry.register(client, _record("celery@plain"), caps, None, ttl=1)
    # When its record expires and is pruned
    client.delete(keys.worker("celery@signer"), keys.worker("celery@plain"))
    registry.prune(client, now=time.time() + 2)
    # Then its peer id is still what it registered (kept for days), and the other has none
    assert registry.registered_peer(client, "celery@signer") == "12D3KooWpeer"
    assert registry.registered_peer(client, "celery@plain") is None
    assert 0 < client.ttl(keys.schema().peers()) <= PEERS_KEPT_S
