"""DiLoCo through real workers: signed rounds of inner hypha.train tasks and hypha.aggregate, deltas in shared storage.

Each worker has its own store (the tiny causal LM fetched from a local source) and the same shared
storage: a local folder, or an S3 bucket on moto's server. Kept tiny (2 workers, 3 for the kill -9
test; a few steps a round): the machine running these has two cores.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import redis

from hypha_celery import registry
from hypha_celery.client import submit
from hypha_celery.errors import DeltaRejected
from hypha_celery.harness.launch import free_port, scrape, wait_for, worker_env
from hypha_celery.models.examples import TINY_LLAMA
from hypha_celery.models.shared_storage import LocalStorage, S3Storage
from hypha_celery.security import generate_key, peer_id
from hypha_celery.training import diloco
from hypha_celery.training.distributed.membership import Member, registry_members
from tests.conftest import ROOT

SUBJECTS = ("the cat", "a dog", "the bird", "my friend", "the child", "a farmer")
VERBS = ("sat on", "looked at", "walked to", "slept near", "ran past", "found")
OBJECTS = ("the mat", "a tree", "the river", "the old house", "a red ball", "the garden")
TRAIN = {"lr": 3e-3, "batch_size": 4, "max_length": 32, "seed": 1}
CORES = {"cpu_cores": 1}


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(n)]


def shards(count: int, size: int) -> list[dict[str, Any]]:
    texts = corpus(count * size, seed=7)
    return [{"texts": texts[index::count]} for index in range(count)]


def corpus_loss(app: Any, key: nacl.signing.SigningKey, model: str, texts: list[str]) -> float:
    """The model's mean next-token loss on ``texts``: the first (and only) step of a training on all of them at once,
    measured before that step changes anything (it is stored under a new id; ``model`` stays as it is)."""
    result = submit("hypha.train", model=model, data={"texts": texts}, max_steps=1, batch_size=len(texts), lr=1e-9,
                    max_length=32, requirements=CORES, signing_key=key, app=app).get(timeout=300)
    return float(result["output"]["loss_curve"][0])


@pytest.fixture
def key(tmp_path: Path) -> nacl.signing.SigningKey:
    return generate_key(tmp_path / "scheduler.key")


@pytest.fixture
def workers(start_worker: Callable[..., Any], model_dir: Path, tmp_path: Path, redis_url: str,
            key: nacl.signing.SigningKey, monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[Any]]:
    """``workers(storage, count, first=0)``: workers ``first``.. with their own stores, one core each, verifying
    signatures."""
    monkeypatch.setenv("HYPHA_REGISTRY_URL", redis_url)  # the scheduler places and records nonces there

    def start(storage: dict[str, Any], count: int = 2, metrics_ports: tuple[int, ...] = (),
              sources: tuple[Path, ...] = (), first: int = 0, lease_heartbeat: float | None = None,
              envs: dict[int, dict[str, str]] | None = None) -> list[Any]:
        return [start_worker({
            **({"monitoring": {"collect_metrics": True, "metrics_port": metrics_ports[index - first]}} if metrics_ports
               else {}),
            "models": {"model_dir": str(tmp_path / f"store-{index}"),
                       "sources": [{"type": "local", "path": str(path)} for path in (model_dir, *sources)]},
            "training": {"shared_storage": storage},
            "resources": {"node_id": f"node-{index}-{tmp_path.name}", "cpu_cores": 1,
                          **({"lease_heartbeat": lease_heartbeat} if lease_heartbeat else {})},
            "task_timeout": 240,
            "security": {"verify_task_signatures": True, "allowed_schedulers": [peer_id(key.verify_key)]},
        }, env=(envs or {}).get(index)) for index in range(first, first + count)]

    return start


def test_diloco_rounds_on_a_shared_folder_lower_the_loss_and_two_jobs_do_not_mix(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any], key: nacl.signing.SigningKey,
        tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given two workers sharing a folder, and a corpus cut into two shards
    shared = tmp_path / "shared"
    workers({"type": "local", "path": str(shared)})
    app = celery_client()
    # When two DiLoCo jobs run at once on the tiny causal LM
    first = diloco(TINY_LLAMA, shards(2, 12), rounds=3, inner_steps=4, outer_lr=1.0, outer_momentum=0.5,
                   requirements=CORES, signing_key=key, app=app, round_timeout=300, **TRAIN)
    second = diloco(TINY_LLAMA, shards(2, 8), rounds=1, inner_steps=2, outer_lr=1.0, outer_momentum=0.5,
                    requirements=CORES, signing_key=key, app=app, round_timeout=300, **TRAIN)
    done, other = first.wait(timeout=900), second.wait(timeout=300)
    # Then each round used both workers' deltas, and the global loss fell from round to round
    rounds = done["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["refused"] == [] and r["bytes_moved"] > 0 and len(r["workers"]) >= 1 for r in rounds)
    losses = [r["loss"] for r in rounds]
    assert losses[-1] < losses[0] * 0.9, losses
    assert first.progress()["stage"] == "done" and len(first.progress()["history"]) == 3
    # And the final version is a stored model in the shared folder, child of the round before
    storage = LocalStorage(shared)
    manifest = json.loads(storage.get_bytes(f"models/{done['model_id']}/manifest.json") or b"{}")
    assert done["model_id"] == f"{first.job}-v3" and manifest["parent"] == f"{first.job}-v2"
    # And its final model is within a stated margin of one worker trained on the whole corpus for as many steps as
    # all inner steps together (2 workers x 3 rounds x 4)
    texts = [text for shard in shards(2, 12) for text in shard["texts"]]
    alone = submit("hypha.train", model=TINY_LLAMA, data={"texts": texts}, max_steps=2 * 3 * 4, requirements=CORES,
                   signing_key=key, app=app, **TRAIN).get(timeout=300)["output"]["model_id"]
    # (that model is in its trainer's store alone: placement sends it tasks once the trainer's record lists it, at
    # its next refresh; on a busy machine that can come after the next task is placed, on the other worker)
    wait_for(lambda: any(alone in worker["models"] for worker in registry.list_workers(redis_client)), 30,
             f"a worker's record to list {alone}")
    diloco_loss, alone_loss = corpus_loss(app, key, done["model_id"], texts), corpus_loss(app, key, alone, texts)
    assert diloco_loss < 1.5 * alone_loss, (diloco_loss, alone_loss)
    # And the two jobs' rounds stayed apart: each record lists deltas of its own job only
    assert other["model_id"] == f"{second.job}-v1"
    for job, count in ((first.job, 3), (second.job, 1)):
        for round_ in range(1, count + 1):
            record = json.loads(storage.get_bytes(f"jobs/{job}/round-{round_}/aggregate.json") or b"{}")
            assert record["job"] == job and record["round"] == round_ and record["deltas"] == 2
            deltas = sorted((shared / "jobs" / job / f"round-{round_}").glob("*.safetensors"))
            assert len(deltas) == 2


def test_a_bfloat16_model_trains_with_diloco_and_each_version_stays_bfloat16(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any], key: nacl.signing.SigningKey,
        model_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from hypha_celery.formats.safetensors import read_header
    from hypha_celery.models.store import ModelStore

    # Given the tiny causal LM with its weights in bfloat16, as published checkpoints are, in a source of its own
    folder = ModelStore(model_dir).open(TINY_LLAMA).folder
    copy = tmp_path / "bf16-copy"
    copy.mkdir()
    for entry in folder.iterdir():
        if entry.is_file() and entry.name != "manifest.json":
            (copy / entry.name).write_bytes(entry.read_bytes())
    weights = load_file(str(folder / "model.safetensors"))
    save_file({name: tensor.to(torch.bfloat16) for name, tensor in weights.items()}, str(copy / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((copy / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (copy / "config.json").write_text(json.dumps(config))
    source = tmp_path / "bf16-source"
    ModelStore(source).add("transformers", copy, "tiny-llama-bf16")
    shared = tmp_path / "shared"
    workers({"type": "local", "path": str(shared)}, sources=(source,))
    # When DiLoCo trains it for two rounds on two workers
    done = diloco("tiny-llama-bf16", shards(2, 8), rounds=2, inner_steps=3, outer_lr=1.0, outer_momentum=0.5,
                  requirements=CORES, signing_key=key, app=celery_client(), round_timeout=300, **TRAIN).wait(timeout=600)
    # Then both rounds took both deltas, and each version is bfloat16 like its base
    assert [(r["round"], r["refused"], len(r["workers"]) >= 1) for r in done["rounds"]] == [(1, [], True), (2, [], True)]
    for version in ("v1", "v2"):
        header = read_header(shared / "models" / done["model_id"].replace("v2", version) / "model.safetensors")
        assert header.dtype == "bfloat16", (version, header.dtype)


@pytest.fixture
def s3_storage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A bucket on moto's S3 server (dummy credentials, inherited by the workers)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true"),
                        ("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config")),
                        ("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))):
        monkeypatch.setenv(name, value)
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", region_name="us-east-1", endpoint_url=endpoint).create_bucket(Bucket="diloco")
    yield {"type": "s3", "bucket": "diloco", "region": "us-east-1", "endpoint_url": endpoint, "prefix": "runs"}
    server.stop()


def test_on_s3_a_tampered_delta_and_another_rounds_delta_are_refused(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any], key: nacl.signing.SigningKey,
        s3_storage: dict[str, Any]) -> None:
    # Given two workers sharing an S3 bucket, and one round's inner tasks run by hand (signed like any task)
    ports = (free_port(), free_port())
    workers(s3_storage, metrics_ports=ports)
    app = celery_client()
    job = "tamper-test"

    def inner(shard: dict[str, Any], round_: int) -> dict[str, Any]:
        result = submit("hypha.train", model=TINY_LLAMA, data=shard, requirements=CORES, signing_key=key, app=app,
                        diloco={"job": job, "round": round_, "inner_steps": 2}, **TRAIN).get(timeout=300)
        return dict(result["output"]["diloco"])

    def outer(reports: list[dict[str, Any]], min_workers: int) -> Any:
        return submit("hypha.aggregate", job=job, round=1, base=TINY_LLAMA, deltas=reports, min_workers=min_workers,
                      outer_lr=1.0, outer_momentum=0.0, requirements={"cpu_cores": 0.5, "memory": "512MiB"},
                      signing_key=key, app=app)

    one, two = (inner(shard, 1) for shard in shards(2, 4))
    straggler = inner(shards(1, 4)[0], 2)  # the same job's next round: never applied to round 1
    assert one["ref"].startswith(f"jobs/{job}/round-1/") and len(one["sha256"]) == 64 and one["samples"] == 4
    # When one delta's bytes are altered in the bucket after its inner task reported them
    storage = S3Storage("diloco", region="us-east-1", endpoint_url=s3_storage["endpoint_url"], prefix="runs")
    raw = storage.client.get_object(Bucket="diloco", Key=f"runs/{two['ref']}")["Body"].read()
    storage.client.put_object(Bucket="diloco", Key=f"runs/{two['ref']}", Body=raw[:-4] + b"\0\0\0\0")
    # Then an outer step that needs both deltas is refused, naming the tampered one
    with pytest.raises(DeltaRejected, match="tampered or corrupt"):
        outer([one, two, straggler], min_workers=2).get(timeout=120)
    # And one that needs one applies the good delta only, refusing the tampered and the straggler's
    out = outer([one, two, straggler], min_workers=1).get(timeout=120)["output"]
    reasons = {entry["ref"]: entry["reason"] for entry in out["refused"]}
    assert out["deltas"] == 1 and set(reasons) == {two["ref"], straggler["ref"]}
    assert "tampered" in reasons[two["ref"]] and "round 2" in reasons[straggler["ref"]]
    # And the workers count the outer step it applied, the deltas it took and refused, and the bytes moved
    samples = [scrape(port) for port in ports]
    total = {name: sum(sample.get(name, 0.0) for sample in samples) for name in (
        "hypha_worker_diloco_rounds_total", 'hypha_worker_diloco_deltas_total{outcome="accepted"}',
        'hypha_worker_diloco_deltas_total{outcome="refused"}', "hypha_worker_diloco_bytes_moved_total")}
    assert total == {"hypha_worker_diloco_rounds_total": 1, 'hypha_worker_diloco_deltas_total{outcome="accepted"}': 1,
                     'hypha_worker_diloco_deltas_total{outcome="refused"}': 2,
                     "hypha_worker_diloco_bytes_moved_total": out["bytes_moved"]}
    # And the next version is in the bucket, fetched by a worker like any model (it serves a generation)
    assert storage.exists(f"models/{job}-v1/manifest.json")
    text = submit("hypha.generate", model=f"{job}-v1", prompt="the cat", max_new_tokens=4, signing_key=key,
                  app=app).get(timeout=120)["output"]["text"]
    assert isinstance(text, str)
    # And the round is idempotent: asked again, it answers the same version from its record
    again = outer([one], min_workers=1).get(timeout=120)["output"]
    assert again["replayed"] is True and again["sha256"] == out["sha256"]


def test_poisoned_deltas_are_refused_weights_are_the_schedulers_and_two_outer_steps_answer_one_record(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any], key: nacl.signing.SigningKey,
        model_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from hypha_celery.models.store import ModelStore

    # Given two workers on a shared folder and one round's two honest inner tasks (shards of 4 texts each)
    shared = tmp_path / "shared"
    workers({"type": "local", "path": str(shared)})
    app, job = celery_client(), "poison-test"
    pending = [submit("hypha.train", model=TINY_LLAMA, data=shard, requirements=CORES, signing_key=key, app=app,
                      diloco={"job": job, "round": 1, "inner_steps": 2}, **TRAIN) for shard in shards(2, 4)]
    one, two = (dict(result.get(timeout=300)["output"]["diloco"]) for result in pending)
    # And two lying workers' deltas, written with their true sha256 like any delta: one NaN, one 10^4 x an honest
    # one (finite, the right shapes and metadata); and an honest report that claims 10^15 samples
    storage = LocalStorage(shared)
    with safe_open(str(shared / one["ref"]), framework="numpy") as handle:
        metadata = handle.metadata()
    honest = [load_file(str(shared / report["ref"])) for report in (one, two)]
    planted = []
    for name, tensors in (("evil-nan", {k: np.full_like(v, np.nan) for k, v in honest[0].items()}),
                          ("evil-big", {k: v * 1e4 for k, v in honest[0].items()})):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        ref = f"jobs/{job}/round-1/{name}.safetensors"
        planted.append({**one, "ref": ref, "sha256": storage.put_file(ref, tmp_path / f"{name}.safetensors").sha256,
                        "worker": name})
    reports = [one, {**two, "samples": 10**15}, *planted]
    weights = {Path(report["ref"]).stem: 4 for report in reports}  # the scheduler's shard sizes, signed
    # When two outer steps for the round are sent at once
    sent = [submit("hypha.aggregate", job=job, round=1, base=TINY_LLAMA, deltas=reports, weights=weights,
                   min_workers=2, outer_lr=1.0, outer_momentum=0.0, requirements={"cpu_cores": 0.5, "memory": "512MiB"},
                   signing_key=key, app=app) for _ in range(2)]
    first, second = (result.get(timeout=240)["output"] for result in sent)
    # Then one computed the round and the other answered its record, the same version
    assert sorted([bool(first.get("replayed")), bool(second.get("replayed"))]) == [False, True]
    assert first["sha256"] == second["sha256"] and first["model_id"] == f"{job}-v1"
    # And the two poisoned deltas were refused, each with its reason, the honest two applied
    reasons = {entry["ref"]: entry["reason"] for entry in first["refused"]}
    assert set(reasons) == {report["ref"] for report in planted}, reasons
    assert "NaN or infinite" in reasons[planted[0]["ref"]] and "L2 norm" in reasons[planted[1]["ref"]]
    assert first["deltas"] == 2 and first["weights"] == {one["ref"]: 4, two["ref"]: 4}
    # And the published version is the base minus the plain mean of the honest deltas: 10^15 samples weighed nothing
    folder = ModelStore(model_dir).open(TINY_LLAMA).folder
    base = load_file(str(folder / "model.safetensors"))
    published = load_file(str(shared / "models" / f"{job}-v1" / "model.safetensors"))
    for name, tensor in base.items():
        expected = tensor.astype(np.float64) - (honest[0][name].astype(np.float64) + honest[1][name]) / 2
        np.testing.assert_allclose(published[name], expected.astype(tensor.dtype), rtol=1e-6, atol=1e-7)
    print(f"norms: median {first['median_norm']:.4g}, base {first['base_norm']:.4g}")


def test_a_worker_killed_mid_round_leaves_the_round_to_the_others(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any], key: nacl.signing.SigningKey,
        tmp_path: Path) -> None:
    # Given three workers on a shared folder, and a job of three shards whose rounds need two deltas and wait 3 s
    # for the third once they have them
    started = workers({"type": "local", "path": str(tmp_path / "shared")}, count=3)
    app = celery_client()
    job = diloco(TINY_LLAMA, shards(3, 6), rounds=2, inner_steps=150, outer_lr=1.0, outer_momentum=0.5,
                 min_workers=2, straggler_s=3, requirements=CORES, signing_key=key, app=app, round_timeout=300,
                 **TRAIN)
    # When a worker is killed -9 while it trains its inner task of round 1
    deadline = time.monotonic() + 180
    victim = None
    while victim is None and time.monotonic() < deadline:
        for task_id in job.progress()["tasks"] if job.progress()["round"] == 1 else []:
            if app.AsyncResult(task_id).state == "PROGRESS":
                victim = next((w for w in started if task_id in w.output()), None)
        time.sleep(0.1)
    assert victim is not None, job.progress()
    victim.kill9()
    survivors = {w.name for w in started if w is not victim}
    # Then the job still completes both rounds, each with at least two deltas, from survivors only
    done = job.wait(timeout=600)
    assert [r["round"] for r in done["rounds"]] == [1, 2]
    for entry in done["rounds"]:
        assert {worker.split("@")[0] for worker in entry["workers"]} <= survivors, entry
        assert entry["samples"] >= 2 * 6 and entry["refused"] == [], entry
    # And training went on: the second round started from a lower loss than the first
    assert done["rounds"][1]["loss"] < done["rounds"][0]["loss"]


def test_the_cli_runs_diloco_with_a_progress_bar_per_round(workers: Callable[..., list[Any]], redis_url: str,
                                                            tmp_path: Path) -> None:
    # Given a worker on a shared folder, and two shard files
    workers({"type": "local", "path": str(tmp_path / "shared")}, count=1)
    files = []
    for index, shard in enumerate(shards(2, 4)):
        files += ["--shard", str(tmp_path / f"shard-{index}.json")]
        (tmp_path / f"shard-{index}.json").write_text(json.dumps(shard))
    # When `hypha-celery run diloco` trains two rounds, signed with the scheduler's key file
    out = subprocess.run(
        [sys.executable, "-m", "hypha_celery.cli", "run", "diloco", "--model", TINY_LLAMA, *files, "--rounds", "2",
         "--inner-steps", "2", "--outer-lr", "1.0", "--outer-momentum", "0.5", "--lr", "0.003", "--batch-size", "4",
         "--max-length", "32", "--key", str(tmp_path / "scheduler.key"), "--timeout", "300"],
        capture_output=True, text=True, timeout=400, cwd=ROOT, env=worker_env(redis_url, redis_url, redis_url),
    )
    # Then it drew a bar per round and a line per round done, and printed the result as JSON
    assert out.returncode == 0, out.stderr
    assert "round 1/2" in out.stderr and "round 2/2" in out.stderr and "round 2: loss" in out.stderr
    result = json.loads(out.stdout)
    assert result["model_id"].endswith("-v2") and [r["round"] for r in result["rounds"]] == [1, 2]


def test_a_worker_that_joins_mid_job_trains_from_the_next_round(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any], key: nacl.signing.SigningKey,
        tmp_path: Path) -> None:
    # Given one worker on a shared folder, and a job of three shards over five rounds: one inner task a round, the
    # shards in turn. Its members are the registry's (as by default); round 4 reads them once the late worker is up
    # (the job's rounds take a second here, a worker's start many)
    storage = {"type": "local", "path": str(tmp_path / "shared")}
    (first,) = workers(storage, count=1, lease_heartbeat=5)
    app = celery_client()
    registry_read, joined, rounds_read = registry_members(CORES), threading.Event(), []

    def members() -> list[Member]:
        rounds_read.append(len(rounds_read) + 1)
        if len(rounds_read) == 4:
            joined.wait(300)
        return registry_read()

    job = diloco(TINY_LLAMA, shards(3, 4), rounds=5, inner_steps=12, outer_lr=1.0, outer_momentum=0.5,
                 requirements=CORES, signing_key=key, app=app, round_timeout=300, members=members, **TRAIN)
    # When a second worker starts while round 3 runs
    wait_for(lambda: job.progress()["round"] >= 3, 600, "round 3")
    assert job.progress()["round"] == 3, "round 3 ended before the second worker started"
    (late,) = workers(storage, count=1, first=1, lease_heartbeat=5)
    # (warmed by one training task on its own queue first, as a worker that joins a network would be: a cold worker's
    # first training spends tens of seconds here importing torch. Leases renew every 5 s, the default, not the
    # suite's 1 s: on a loaded machine a worker fetching the round's version stalls past a 2 s lease, and the sweeper
    # hands its task to the other worker, whose copy then answers first)
    queue = next(m.queue for m in registry_read() if m.worker.split("@")[0] == late.name)
    submit("hypha.train", model=TINY_LLAMA, data={"texts": corpus(4, seed=3)}, max_steps=1, requirements=CORES,
           signing_key=key, app=app, queue=queue, **TRAIN).get(timeout=300)
    joined.set()
    done = job.wait(timeout=900)
    rounds = done["rounds"]
    print("rounds:", [(r["round"], r["assigned"], r["duration_s"],
                       [(i["worker"], i["shard"], i["steps"], i["seconds"]) for i in r["inner"]]) for r in rounds])
    # Then rounds 1-3 sent one task each, to the first worker, the shards in turn
    for entry in rounds[:3]:
        assert entry["assigned"] == 1 and [row["worker"].split("@")[0] for row in entry["inner"]] == [first.name]
    assert [entry["inner"][0]["shard"] for entry in rounds[:3]] == [0, 1, 2]
    # And round 4 sent two, and the new worker's delta is in it: it fetched round 3's global version from the shared
    # storage, trained its shard, and reported its steps and seconds
    for entry in rounds[3:]:
        assert entry["assigned"] == 2 and entry["refused"] == [] and entry["failed"] == {}, entry
        rows = {row["worker"].split("@")[0]: row for row in entry["inner"]}
        assert set(rows) == {first.name, late.name}, entry
        assert rows[late.name]["steps"] == 12 and rows[late.name]["seconds"] > 0
    assert sorted(row["shard"] for row in rounds[3]["inner"]) == [0, 1]
    assert done["model_id"] == f"{job.job}-v5"


def test_int8_rounds_lower_the_loss_in_about_a_quarter_of_the_bytes_and_leave_no_residual(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any], key: nacl.signing.SigningKey,
        model_dir: Path, tmp_path: Path) -> None:
    from hypha_celery.formats.safetensors import read_header
    from hypha_celery.models.store import ModelStore
    from hypha_celery.training.distributed.compression import RESIDUALS
    from hypha_celery.training.distributed.deltas import read_metadata

    # Given two workers sharing a folder
    shared = tmp_path / "shared"
    workers({"type": "local", "path": str(shared)})
    # When a DiLoCo job sends int8 pseudo-gradients with error feedback for three rounds
    done = diloco(TINY_LLAMA, shards(2, 12), rounds=3, inner_steps=4, outer_lr=1.0, outer_momentum=0.5,
                  compression="int8", requirements=CORES, signing_key=key, app=celery_client(), round_timeout=300,
                  **TRAIN).wait(timeout=900)
    # Then every delta was accepted and is at most 0.27 x the float32 parameters' bytes
    folder = ModelStore(model_dir).open(TINY_LLAMA).folder
    float32_bytes = 4 * read_header(folder / "model.safetensors").parameters
    for entry in done["rounds"]:
        assert entry["refused"] == [] and entry["inner"], entry
        assert all(0 < inner["delta_bytes"] <= 0.27 * float32_bytes for inner in entry["inner"]), (entry, float32_bytes)
    # And the stored delta names its encoding; the loss fell from round to round
    delta = next((shared / "jobs" / done["model_id"].rsplit("-v", 1)[0] / "round-1").glob("*.safetensors"))
    assert read_metadata(delta).get("encoding") == "int8-block256"
    losses = [r["loss"] for r in done["rounds"]]
    assert losses[-1] < losses[0] * 0.9, losses
    # And after the final round no worker keeps the job's residual
    assert not list(tmp_path.glob(f"store-*/{RESIDUALS}/*.safetensors"))


def test_a_time_boxed_round_does_not_wait_for_a_slow_workers_steps(
        workers: Callable[..., list[Any]], celery_client: Callable[..., Any], key: nacl.signing.SigningKey,
        tmp_path: Path) -> None:
    from hypha_celery.training.distributed.inner import STEP_DELAY_ENV
    from hypha_celery.training.distributed.layout import record_key

    # Given two workers, the second made slow by the test hook (it sleeps 0.4 s after each optimizer step)
    shared = tmp_path / "shared"
    started = workers({"type": "local", "path": str(shared)}, envs={1: {STEP_DELAY_ENV: "0.4"}})
    slow = started[1].name
    # When a DiLoCo job time-boxes its inner tasks to 4 s of training, two rounds
    seconds = 4.0
    job = diloco(TINY_LLAMA, shards(2, 12), rounds=2, inner_seconds=seconds, outer_lr=1.0, outer_momentum=0.5,
                 requirements=CORES, signing_key=key, app=celery_client(), round_timeout=300, **TRAIN)
    done = job.wait(timeout=600)
    # Then each inner task stopped at its time box: the slow worker's steps fit in 4 s at 0.4 s each, and a worker
    # trained no longer than the box (at the mean step time, one step over at most)
    storage = LocalStorage(shared)
    for entry in done["rounds"]:
        assert entry["refused"] == [] and entry["inner"], entry
        for inner in entry["inner"]:
            assert inner["steps"] >= 1 and inner["train_s"] is not None
            if inner["worker"].split("@")[0] == slow:
                assert inner["steps"] <= seconds / 0.4, entry
        # And when both workers took a task, the fast one did more steps than the slow one (the round took the
        # slow one's fewer steps, it did not wait for it to do as many), and each delta weighs shard size x steps
        by_worker = {inner["worker"].split("@")[0]: inner["steps"] for inner in entry["inner"]}
        if len(by_worker) == 2:
            fast = next(name for name in by_worker if name != slow)
            assert by_worker[fast] > by_worker[slow], entry
        record = json.loads(storage.get_bytes(record_key(job.job, entry["round"])) or b"{}")
        steps = sorted(inner["steps"] for inner in entry["inner"])
        cap = 4 * steps[(len(steps) - 1) // 2]  # timebox.STEPS_CAP_RATIO x the lower median
        assert sorted(record["weights"].values()) == [12 * min(n, cap) for n in steps], record
    print("time-boxed rounds:", [(e["duration_s"], e["inner"]) for e in done["rounds"]])
