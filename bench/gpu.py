"""The GPU part of ``make bench``: batching on ``cuda`` through the serving executor, in one run.

Without an NVIDIA GPU (NVML finds none) it says so and measures nothing. With
one, it builds two models offline (random weights, real architectures): a
MiniLM-sized BERT classifier (6 layers, hidden 384) and a ~135M-parameter
Llama, and measures through :class:`~hypha_celery.executor.pool.ExecutorPool`
on ``cuda:0`` (bf16), the same executor process a worker uses:

* inference, 64 concurrent clients of one text each: batched (up to 64 per
  pass) vs one request per pass; target >= 20x; beside it the worker's own CPU
  per request (this process's CPU time: dispatch, batching, the protocol);
* generation, 8 and 32 concurrent greedy requests of 64 new tokens: batched vs
  the same requests one after another (completion tokens/s); target >= 3x at 8.

* checkable generations: proofs made on ``cuda`` in bf16 (tiny Llama), verified on the CPU in float32.

``python -m bench.gpu`` runs it alone and prints JSON (``--only proofs``: the proofs check alone, seconds);
``make bench`` includes it.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run"]

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat"
PROMPTS = ["Once upon a time", "The cat sat on the", "In a distant land", "A long time ago",
           "The weather today is", "My favourite food is", "The river flowed past", "She opened the door and"]
CLIENTS = 64
REPEATS = 3


def _models(root: Path) -> Path:
    from hypha_celery.models.examples import write_tiny_bert, write_tiny_llama
    from hypha_celery.models.store import ModelStore

    store = ModelStore(root / "store")
    for name, write in (
        ("bench-bert", lambda f: write_tiny_bert(f, classifier=True, hidden=384, layers=6, intermediate=1536,
                                                 positions=128)),
        ("bench-llama", lambda f: write_tiny_llama(f, positions=512, hidden=1024, layers=12, intermediate=2816,
                                                   heads=16, kv_heads=4)),
    ):
        folder = root / name
        folder.mkdir()
        write(folder)
        store.add("transformers", folder, name)
    return root / "store"


def _pool(store: Path, batch: int) -> Any:
    from hypha_celery.executor.pool import ExecutorPool
    from hypha_celery.executor.process import ExecutorSettings

    return ExecutorPool(ExecutorSettings(store=str(store), cache_size=16 * 10**9, max_model_size=16 * 10**9,
                                         sandbox=True, nice=0, enforce_memory=False, enforce_cpu=False,
                                         max_batch_size=batch, max_queue_delay_s=0.005))


def _lease() -> Any:
    from hypha_celery.resources.ledger import Lease

    return Lease(id="bench-gpu", node="bench", memory=4 * 2**30, cores={}, gpus={0: 8 * 2**30}, exclusive_gpu=False)


def _concurrently(clients: int, work: Callable[[int], Any]) -> tuple[float, list[Any]]:
    results: list[Any] = [None] * clients
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            results[index] = work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, results


def _infer_rate(store: Path, batch: int, per_client: int) -> tuple[float, float]:
    """Inferences/s, and the CPU seconds per request spent in this process (the worker's side of the
    pipe: dispatch, batching, the JSON-lines protocol; the executor's model compute is not in it)."""
    pool = _pool(store, batch)
    lease = _lease()
    try:
        def one() -> Any:
            return pool.infer(model="bench-bert", inputs={"texts": [TEXT]}, lease=lease, timeout=300, batchable=True)

        one()  # load the model: the cold load is not what this measures
        cpu = time.process_time()
        elapsed, _ = _concurrently(CLIENTS, lambda i: [one() for _ in range(per_client)])
        requests = CLIENTS * per_client
        return requests / elapsed, (time.process_time() - cpu) / requests
    finally:
        pool.close()


def _generate_rate(store: Path, concurrent: int, batched: bool, new_tokens: int) -> tuple[float, int]:
    from hypha_celery.stages.validation import GenerateParams
    from hypha_celery.work import Generate, Prompt

    pool = _pool(store, 64 if batched else 1)
    lease = _lease()
    params = GenerateParams(max_new_tokens=new_tokens).to_json()
    try:
        def one(index: int) -> Any:
            job = Generate(model="bench-llama", params=params, prompts=[Prompt(prompt=PROMPTS[index % len(PROMPTS)])])
            return pool.generate(job, lease=lease, timeout=600)

        one(0)
        if batched:
            elapsed, results = _concurrently(concurrent, one)
        else:
            started = time.perf_counter()
            results = [one(i) for i in range(concurrent)]
            elapsed = time.perf_counter() - started
        tokens = sum(r.output.completion_tokens for r in results)
        return tokens / elapsed, max(r.batch_size for r in results)
    finally:
        pool.close()


def proofs(say: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """A proof made on ``cuda`` in bf16, verified on the CPU in float32 (:func:`bench.proofs.cross_device`)."""
    from bench.proofs import cross_device

    return cross_device(say)


def run(say: Callable[[str], None] = print, only: str | None = None) -> dict[str, dict[str, Any]]:
    """Measure the GPU figures; ``{}`` (and a line saying why) without a GPU. ``only="proofs"``: that check alone."""
    if only == "proofs":
        return proofs(say)
    from hypha_celery.resources.gpu import list_gpus

    gpus = list_gpus()
    if not gpus:
        say("    no NVIDIA GPU found by NVML: the GPU figures need one (run `make bench` on a GPU machine)")
        return {}
    say(f"    GPU 0: {gpus[0].model}, {gpus[0].memory / 2**30:.0f} GiB, compute capability {gpus[0].compute_capability}")
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hypha-bench-gpu-") as tmp:
        store = _models(Path(tmp))
        single = [_infer_rate(store, 1, 4)[0] for _ in range(REPEATS)]
        runs = [_infer_rate(store, 64, 16) for _ in range(REPEATS)]
        batched = [rate for rate, _ in runs]
        cpu_us = statistics.median(cpu for _, cpu in runs) * 1e6
        ratio = statistics.median(batched) / statistics.median(single)
        say(f"    cuda inference, {CLIENTS} clients, one per pass  median {statistics.median(single):9.1f} inferences/s")
        say(f"    cuda inference, {CLIENTS} clients, batched <=64  median {statistics.median(batched):9.1f} inferences/s")
        say(f"    ratio {ratio:.1f} (target >= 20); the worker's own CPU per request (batched, executor excluded) "
            f"{cpu_us:.0f} us")
        figures["gpu_infer_batched"] = {"ratio": ratio, "target": ">= 20", "met": ratio >= 20,
                                        "unit": "batched/unbatched inferences per s on cuda", "single": single,
                                        "batched": batched, "clients": CLIENTS}
        figures["gpu_worker_cpu_per_task"] = {"ratio": cpu_us, "target": "reported", "met": True,
                                              "unit": "us of the worker process's CPU per batched request on cuda "
                                                      "(dispatch, batching, protocol; the executor excluded)"}
        for concurrent in (8, 32):
            seq = [_generate_rate(store, concurrent, False, 64)[0] for _ in range(REPEATS)]
            runs = [_generate_rate(store, concurrent, True, 64) for _ in range(REPEATS)]
            together = [rate for rate, _ in runs]
            ratio = statistics.median(together) / statistics.median(seq)
            largest = max(size for _, size in runs)
            say(f"    cuda generation, {concurrent} greedy requests: sequential {statistics.median(seq):8.1f} tokens/s, "
                f"batched {statistics.median(together):8.1f} tokens/s (largest batch {largest}); ratio {ratio:.1f}"
                + (" (target >= 3)" if concurrent == 8 else " (reported)"))
            figures[f"gpu_generate_batched_{concurrent}"] = {
                "ratio": ratio, "target": ">= 3" if concurrent == 8 else "reported",
                "met": ratio >= 3 if concurrent == 8 else True, "unit": "batched/sequential completion tokens per s",
                "sequential": seq, "batched": together, "largest_batch": largest}
    figures.update(proofs(say))
    return figures


if __name__ == "__main__":
    print(json.dumps(run(only="proofs" if sys.argv[1:] == ["--only", "proofs"] else None), indent=2, sort_keys=True))
    sys.exit(0)
