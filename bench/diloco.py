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
    options = parser.parse_args()
    from hypha_celery.harness.embedded_redis import EmbeddedRedis

    server = None
    url = os.environ.get("HYPHA_BENCH_REDIS_URL", "")
    if not url:
        server = EmbeddedRedis()
        url = server.start()
    workdir = Path(tempfile.mkdtemp(prefix="hypha-bench-diloco-"))
    try:
        bench_diloco(url, workdir, workers=options.workers, rounds=options.rounds, inner_steps=options.inner_steps)
        (ROOT / "bench" / "diloco-results.json").write_text(json.dumps(RESULTS, indent=2, sort_keys=True) + "\n")
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def bench_diloco(url: str, workdir: Path, *, workers: int = 2, rounds: int = 3, inner_steps: int = 20) -> None:
    """``make bench`` step 16: a DiLoCo job on ``workers`` real workers sharing a folder under ``workdir``."""
    from hypha_celery.models.examples import TINY_LLAMA, init_examples
    from hypha_celery.models.store import ModelStore
    from hypha_celery.training import diloco

    os.environ["HYPHA_REGISTRY_URL"] = url
    workdir = workdir / "diloco"
    running = []
    try:
        init_examples(workdir / "models")
        app = client_app(url, url, name="hypha-bench-diloco")
        for index in range(workers):
            config = hypha_config(workdir / f"store-{index}", task_timeout=600)
            config["models"]["sources"] = [{"type": "local", "path": str(workdir / "models")}]
            config.update(training={"shared_storage": {"type": "local", "path": str(workdir / "shared")}},
                          resources={**config["resources"], "cpu_cores": 1})
            running.append(start_worker("hypha_celery", url, workdir, config=config, concurrency=1))
        for worker in running:
            wait_ready(worker, app)
        shards = _corpus(workers, 16)
        train = {"lr": 3e-3, "batch_size": 4, "max_length": 32, "seed": 1}
        cores = {"cpu_cores": 1}
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
                f"data-parallel {data_parallel / 1e6:.2f} MB  ratio {ratios[-1]:.1f}")
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
    finally:
        for worker in running:
            worker.stop()


def _float32_bytes(path: Path) -> int:
    """The parameters' bytes in float32, from the safetensors header (what a gradient exchange carries)."""
    from hypha_celery.formats.safetensors import read_header

    return 4 * read_header(path).parameters


if __name__ == "__main__":
    raise SystemExit(main())
