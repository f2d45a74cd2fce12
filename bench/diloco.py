"""DiLoCo's point, measured: bytes moved per round vs plain data-parallel for the same steps; a round's wall time.

``python -m bench.diloco [--workers 2] [--rounds 3] [--inner-steps 20]`` (also ``make bench`` step 16).
It starts an embedded Redis (or ``$HYPHA_BENCH_REDIS_URL``) and ``--workers`` real workers
sharing a folder, runs a DiLoCo job on ``tiny-llama`` with one shard per worker, and reports:

* ``diloco_bytes_ratio``: bytes plain data-parallel would move for the same steps / bytes DiLoCo
  moved. Data-parallel exchanges once per optimizer step: each worker sends its gradient and
  receives the average (2 x the float32 parameter bytes per worker per step, an ideal all-reduce
  counted at its endpoints); DiLoCo once per round: each worker pulls the round's weights and
  pushes one pseudo-gradient (what the outer step reports as ``bytes_moved``, measured from the
  files). The ratio is about ``inner_steps``.
* ``diloco_round_time``: a warm round's wall time (the rounds after the first, which also starts
  the executors and fetches the model) with every worker training its shard / one plain
  ``hypha.train`` of the same inner steps on one shard (the round's overhead: pseudo-gradients,
  the outer step, the uploads; on a machine with fewer cores than workers the workers also share
  the cores).
* ``diloco_compression_<none|bf16|int8|int8_no_feedback>``: the same job over 6 rounds (``--compress-rounds``)
  with each ``compression``: bytes per delta over the uncompressed delta's, and the final model's loss on the
  whole corpus over the uncompressed job's (targets: int8 <= 0.27x bytes and within 5% of the loss, bf16 within
  2%; ``int8_no_feedback`` is int8 with ``error_feedback=False``, to measure what error feedback buys).
* ``diloco_timebox``: rounds time-boxed to ``--inner-seconds`` T with the second worker made slower by the test
  hook (a sleep after each step, ``HYPHA_TEST_STEP_DELAY_S``): each worker's reported steps, each round's inner
  phase and outer step, and the warm rounds' inner phase over T (target <= 1.2; the inner phase also holds the
  round's model fetch and load and the delta's upload).
* ``diloco_lora``: the same job (``--compress-rounds`` rounds of ``--compress-steps``) with ``method="lora"`` (r 8)
  and as a full fine-tune: bytes per LoRA delta (the adapter's tensors only) over the full fine-tune's, each job's
  losses per round and its last round's inner loss, and the outer step's peak memory in its executor (report).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, hypha_config, record, say, start_worker, wait_ready
from hypha_celery.harness.launch import client_app

__all__ = ["bench_diloco", "main"]

WORDS = ("the cat", "a dog", "the bird", "sat on", "looked at", "ran past", "the mat", "a tree", "the river")


def _corpus(count: int, size: int) -> list[dict[str, Any]]:
    rng = random.Random(3)
    texts = [" ".join(rng.choice(WORDS) for _ in range(4)) + "." for _ in range(count * size)]
    return [{"texts": texts[index::count]} for index in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.diloco", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--compress-rounds", type=int, default=6)
    parser.add_argument("--compress-steps", type=int, default=10)
    parser.add_argument("--inner-seconds", type=float, default=8.0)
    parser.add_argument("--part", choices=("all", "bytes", "compression", "timebox", "lora"), default="all")
    options = parser.parse_args()
    from hypha_celery.harness.embedded_redis import EmbeddedRedis

    server = None
    url = os.environ.get("HYPHA_BENCH_REDIS_URL", "")
    if not url:
        server = EmbeddedRedis()
        url = server.start()
    workdir = Path(tempfile.mkdtemp(prefix="hypha-bench-diloco-"))
    try:
        bench_diloco(url, workdir, workers=options.workers, rounds=options.rounds, inner_steps=options.inner_steps,
                     compress_rounds=options.compress_rounds, compress_steps=options.compress_steps,
                     inner_seconds=options.inner_seconds, part=options.part)
        (ROOT / "bench" / "diloco-results.json").write_text(json.dumps(RESULTS, indent=2, sort_keys=True) + "\n")
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def bench_diloco(url: str, workdir: Path, *, workers: int = 2, rounds: int = 3, inner_steps: int = 20,
                 compress_rounds: int = 6, compress_steps: int = 10, inner_seconds: float = 8.0,
                 part: str = "all") -> None:
    """``make bench`` step 16: DiLoCo jobs on ``workers`` real workers sharing a folder under ``workdir``."""
    from hypha_celery.models.examples import init_examples

    os.environ["HYPHA_REGISTRY_URL"] = url
    workdir = workdir / "diloco"
    running = []
    try:
        init_examples(workdir / "models")
        app = client_app(url, url, name="hypha-bench-diloco")
        running += _workers(url, workdir, app, workers)
        shards = _corpus(workers, 16)
        train = {"lr": 3e-3, "batch_size": 4, "max_length": 32, "seed": 1}
        cores = {"cpu_cores": 1}
        if part in ("all", "bytes"):
            _bytes(app, workdir, shards, train, cores, workers, rounds, inner_steps)
        if part in ("all", "compression"):
            _compression(app, workdir, shards, train, cores, compress_rounds, compress_steps)
        if part in ("all", "lora"):
            _lora(app, shards, train, cores, compress_rounds, compress_steps)
        if part in ("all", "timebox"):
            for worker in running:
                worker.stop()
            running = _workers(url, workdir, app, workers, slow={workers - 1: str(SLOW_STEP_S)}, first=workers)
            _timebox(app, shards, train, cores, inner_seconds)
    finally:
        for worker in running:
            worker.stop()


def _bytes(app: Any, workdir: Path, shards: list[dict[str, Any]], train: dict[str, Any], cores: dict[str, Any],
           workers: int, rounds: int, inner_steps: int) -> None:
    """DiLoCo's bytes against data-parallel's for the same steps, and a warm round's time against one worker's."""
    from hypha_celery.models.examples import TINY_LLAMA
    from hypha_celery.models.store import ModelStore
    from hypha_celery.training import diloco

    job = diloco(TINY_LLAMA, shards, rounds=rounds, inner_steps=inner_steps, outer_lr=1.0,
                 outer_momentum=0.5, requirements=cores, app=app, round_timeout=600, **train)
    done = job.wait(timeout=3600)
    plain = []  # one worker doing one round's inner steps on one shard, its executor warm (after the job)
    for _ in range(3):
        started = time.perf_counter()
        app.send_task("hypha.train", kwargs={"model": TINY_LLAMA, "data": shards[0], "max_steps": inner_steps,
                                             "new_model": f"bench-{uuid.uuid4().hex[:8]}", "requirements": cores,
                                             **train}, queue="hypha").get(timeout=600)
        plain.append(time.perf_counter() - started)
    store = ModelStore(workdir / "models")
    folder = store.open(TINY_LLAMA).folder
    parameter_bytes = _float32_bytes(folder / "model.safetensors")
    say(f"\n[16] DiLoCo: {workers} workers, {rounds} rounds of {inner_steps} inner steps; "
        f"float32 parameters {parameter_bytes / 1e6:.2f} MB")
    ratios = []
    for entry in done["rounds"]:
        workers_in = len(entry["workers"]) if entry["workers"] else workers
        data_parallel = 2 * parameter_bytes * inner_steps * workers
        ratios.append(data_parallel / entry["bytes_moved"])
        say(f"  round {entry['round']}: loss {entry['loss']:.3f}  workers {workers_in}  "
            f"{entry['duration_s']:.2f} s  DiLoCo {entry['bytes_moved'] / 1e6:.2f} MB  "
            f"data-parallel {data_parallel / 1e6:.2f} MB  ratio {ratios[-1]:.1f}  "
            f"deltas {entry.get('compression')}x float32")
        for row in entry.get("inner") or ():
            say(f"    {row['worker']}: shard {row['shard']}, {row['steps']} steps in {row['seconds']} s")
    warm = done["rounds"][1:] or done["rounds"]  # round 1 also starts each worker's executor and fetches the model
    round_s = statistics.median(entry["duration_s"] for entry in warm)
    plain_s = min(plain)
    bytes_ratio = statistics.median(ratios)
    record("diloco_bytes_ratio", ratio=bytes_ratio, target="report", met=True,
           unit="data-parallel bytes / DiLoCo bytes per round", inner_steps=inner_steps, workers=workers)
    record("diloco_round_time", ratio=round_s / plain_s, target="report", met=True,
           unit="a warm round's wall time (rounds after the first) / one worker's inner steps",
           round_s=round_s, one_worker_s=plain_s)
    say(f"  bytes ratio (median) {bytes_ratio:.1f}; round {round_s:.2f} s vs one "
        f"worker's {inner_steps} steps {plain_s:.2f} s: {round_s / plain_s:.2f}x")


SLOW_STEP_S = 0.3  # the slowed worker's sleep after each optimizer step


def _workers(url: str, workdir: Path, app: Any, count: int, slow: dict[int, str] | None = None,
             first: int = 0) -> list[Any]:
    """``count`` workers on one core each, sharing ``workdir/shared``; ``slow``: index -> the test hook's delay."""
    from hypha_celery.training.distributed.inner import STEP_DELAY_ENV

    running = []
    for index in range(first, first + count):
        config = hypha_config(workdir / f"store-{index}", task_timeout=600)
        config["models"]["sources"] = [{"type": "local", "path": str(workdir / "models")}]
        config.update(training={"shared_storage": {"type": "local", "path": str(workdir / "shared")}},
                      resources={**config["resources"], "cpu_cores": 1})
        delay = (slow or {}).get(index - first)
        running.append(start_worker("hypha_celery", url, workdir, config=config, concurrency=1,
                                    env={STEP_DELAY_ENV: delay} if delay else None))
    for worker in running:
        wait_ready(worker, app)
    return running


def _corpus_loss(app: Any, model: str, texts: list[str], cores: dict[str, Any]) -> float:
    """``model``'s mean next-token loss on ``texts``: the first step of a training on all of them at once, taken
    before that step changes anything (lr 1e-9, stored under a new id)."""
    answer = app.send_task("hypha.train", kwargs={"model": model, "data": {"texts": texts}, "max_steps": 1, "lr": 1e-9,
                                                  "batch_size": len(texts), "max_length": 32, "requirements": cores,
                                                  "new_model": f"eval-{uuid.uuid4().hex[:8]}"},
                           queue="hypha").get(timeout=600)
    return float(answer["output"]["loss_curve"][0])


def _compression(app: Any, workdir: Path, shards: list[dict[str, Any]], train: dict[str, Any], cores: dict[str, Any],
                 rounds: int, steps: int) -> None:
    """The same job under each compression: bytes per delta and the final loss, against the uncompressed job."""
    from hypha_celery.models.examples import TINY_LLAMA
    from hypha_celery.training import diloco

    texts = [text for shard in shards for text in shard["texts"]]
    say(f"\n[16] DiLoCo compression: {len(shards)} workers, {rounds} rounds of {steps} inner steps")
    runs: dict[str, dict[str, Any]] = {}
    for label, compression, feedback in (("none", "none", True), ("bf16", "bf16", True), ("int8", "int8", True),
                                         ("int8_no_feedback", "int8", False)):
        done = diloco(TINY_LLAMA, shards, rounds=rounds, inner_steps=steps, outer_lr=1.0, outer_momentum=0.5,
                      compression=compression, error_feedback=feedback, requirements=cores, app=app,
                      round_timeout=600, **train).wait(timeout=3600)
        sizes = [inner["delta_bytes"] for entry in done["rounds"] for inner in entry["inner"]]
        runs[label] = {"delta_bytes": statistics.median(sizes), "loss": _corpus_loss(app, done["model_id"], texts, cores),
                       "round_losses": [round(entry["loss"], 4) for entry in done["rounds"]],
                       "weights": workdir / "shared" / "models" / done["model_id"] / "model.safetensors"}
    plain = runs["none"]
    for run in runs.values():  # how far each final model ended from the uncompressed job's, relative to its norm
        run["drift"] = _distance(run.pop("weights"), plain["weights"]) if run is not plain else 0.0
    plain.pop("weights")
    for label, run in runs.items():
        bytes_ratio, loss_ratio = run["delta_bytes"] / plain["delta_bytes"], run["loss"] / plain["loss"]
        bound = {"bf16": 1.02, "int8": 1.05}.get(label)
        met = bound is None or (loss_ratio <= bound and (label != "int8" or bytes_ratio <= 0.27))
        target = {"bf16": "loss <= 1.02x", "int8": "bytes <= 0.27x, loss <= 1.05x"}.get(label, "report")
        record(f"diloco_compression_{label}", ratio=bytes_ratio, target=target, met=met,
               unit="bytes per delta / the uncompressed delta's", delta_bytes=run["delta_bytes"],
               final_loss=run["loss"], loss_ratio=loss_ratio, round_losses=run["round_losses"], rounds=rounds,
               inner_steps=steps, drift_from_uncompressed=run["drift"])
        say(f"  {label:17s} delta {run['delta_bytes'] / 1e6:.3f} MB ({bytes_ratio:.3f}x)  final loss "
            f"{run['loss']:.4f} ({loss_ratio:.4f}x)  weights' distance to the uncompressed job's "
            f"{run['drift']:.2e} (relative)  per round {run['round_losses']}")


def _lora(app: Any, shards: list[dict[str, Any]], train: dict[str, Any], cores: dict[str, Any], rounds: int,
          steps: int) -> None:
    """A LoRA DiLoCo job against a full one: bytes per delta, final loss, the outer step's memory."""
    from hypha_celery.models.examples import TINY_LLAMA
    from hypha_celery.training import diloco

    say(f"\n[16] DiLoCo over a LoRA adapter vs full weights: {len(shards)} workers, {rounds} rounds of {steps} steps")
    runs: dict[str, dict[str, Any]] = {}
    for label, options in (("full", {}), ("lora", {"method": "lora", "lora": {"r": 8}, "lr": 1e-2})):
        done = diloco(TINY_LLAMA, shards, rounds=rounds, inner_steps=steps, outer_lr=1.0, outer_momentum=0.5,
                      requirements=cores, app=app, round_timeout=600, **{**train, **options}).wait(timeout=3600)
        sizes = [inner["delta_bytes"] for entry in done["rounds"] for inner in entry["inner"]]
        # the last round's inner loss (its workers' last steps): hypha.train takes no adapter to measure a corpus loss
        runs[label] = {"delta_bytes": statistics.median(sizes), "loss": done["rounds"][-1]["inner_loss"],
                       "memory_peak": max(entry.get("outer_memory_peak") or 0 for entry in done["rounds"]),
                       "round_losses": [round(entry["loss"], 4) for entry in done["rounds"]]}
        say(f"  {label:5s} delta {runs[label]['delta_bytes']} B  final loss {runs[label]['loss']:.4f}  outer step peak "
            f"{runs[label]['memory_peak'] / 2**20:.1f} MiB  per round {runs[label]['round_losses']}")
    ratio = runs["lora"]["delta_bytes"] / runs["full"]["delta_bytes"]
    record("diloco_lora", ratio=ratio, target="report", met=True,
           unit="bytes per LoRA delta / a full fine-tune's delta", rounds=rounds, inner_steps=steps, **{
               f"{label}_{key}": value for label, run in runs.items() for key, value in run.items()})


def _distance(path: Path, reference: Path) -> float:
    """||weights - reference|| / ||reference||, over all tensors (float64)."""
    from hypha_celery.training.distributed.deltas import l2_norm, load_weights

    one, other = load_weights(path, "a final model"), load_weights(reference, "the uncompressed final model")
    return l2_norm({name: one[name].astype("float64") - other[name] for name in other}) / l2_norm(other)


def _timebox(app: Any, shards: list[dict[str, Any]], train: dict[str, Any], cores: dict[str, Any],
             seconds: float) -> None:
    """Time-boxed rounds with one worker slowed: steps each, and how long a round's inner phase took against T."""
    from hypha_celery.models.examples import TINY_LLAMA
    from hypha_celery.training import diloco

    done = diloco(TINY_LLAMA, shards, rounds=4, inner_seconds=seconds, outer_lr=1.0, outer_momentum=0.5,
                  requirements=cores, app=app, round_timeout=600, **train).wait(timeout=3600)
    say(f"\n[16] DiLoCo time-boxed rounds: T = {seconds:g} s, one worker slowed by {SLOW_STEP_S} s a step")
    for entry in done["rounds"]:
        outer_s = entry["duration_s"] - entry["inner_s"]
        inner = ", ".join(f"{i['worker'].split('@')[0]} {i['steps']} steps in {i['train_s']} s" for i in entry["inner"])
        say(f"  round {entry['round']}: inner phase {entry['inner_s']:.2f} s ({entry['inner_s'] / seconds:.2f} T), "
            f"outer step {outer_s:.2f} s; {inner}")
    warm = done["rounds"][1:]
    ratio = max(entry["inner_s"] for entry in warm) / seconds
    record("diloco_timebox", ratio=ratio, target="<= 1.2", met=ratio <= 1.2,
           unit="the longest warm round's inner phase / inner_seconds", inner_seconds=seconds,
           slow_step_s=SLOW_STEP_S, rounds=[{k: e[k] for k in ("round", "inner_s", "duration_s", "inner")}
                                             for e in done["rounds"]])


def _float32_bytes(path: Path) -> int:
    """The parameters' bytes in float32, from the safetensors header (what a gradient exchange carries)."""
    from hypha_celery.formats.safetensors import read_header

    return 4 * read_header(path).parameters


if __name__ == "__main__":
    raise SystemExit(main())
