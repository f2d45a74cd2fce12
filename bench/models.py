"""Figures for real models (issue 12): batched embeddings and generation through a worker, cold load.

Each is a ratio of two things measured in the same run, like every figure of
``make bench``: embeddings/s from 16 concurrent clients with the worker's
batching on vs off (``[worker.batching] max_batch_size = 1``); completion
tokens/s of 8 greedy generations sent together vs one after another; and the
time to read the largest example model's files vs the time to load it.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPEATS, fmt, hypha_config, record, say, spread, start_worker, wait_ready
from hypha_celery.harness.launch import client_app

__all__ = ["bench_cold_load_largest", "bench_embeddings_batched", "bench_first_request", "bench_generation_batched"]

CLIENTS = 16
GENERATIONS = 8
NEW_TOKENS = 48
# One sentence per request, of similar lengths (the batcher pads a batch to its longest text).
SENTENCES = (
    "The cat sat on the mat by the door.",
    "A dog ran across the park this morning.",
    "I loved this film and its wonderful cast.",
    "This was a terrible and very boring movie.",
    "The weather today is sunny and quite warm.",
    "Heavy rain is expected tomorrow afternoon.",
    "Stock markets fell after the announcement.",
    "The new phone has a much better camera.",
    "She cooked pasta with tomatoes and basil.",
    "Machine learning models run on graphics cards.",
    "The train to the city leaves at nine sharp.",
    "Children played football in the old garden.",
    "The library opens early on Saturday mornings.",
    "He painted the fence a bright shade of blue.",
    "Our flight was delayed by two long hours.",
    "The soup needs a little more salt and pepper.",
)
PROMPTS = (
    "The cat sat on",
    "Once upon a time",
    "The weather today is",
    "In the morning the train",
    "She cooked pasta with",
    "Markets fell sharply after",
    "Children played football in",
    "The new phone has",
)


def bench_embeddings_batched(url: str, workdir: Path, models: Path) -> None:
    from hypha_celery.models.examples import MINILM, TINY_EMBEDDER

    model = MINILM if (models / MINILM).is_dir() else TINY_EMBEDDER
    if not (models / model).is_dir():
        say("\n[6] embeddings: skipped (no embedding example model; install the [hf] extra)")
        return
    per_client = 8 if model == MINILM else 16
    say(f"\n[6] embeddings through Celery: {CLIENTS} concurrent clients, one sentence per request ({model}), "
        "worker batching on vs off")
    # One client app per thread: each submits a request and waits for it before the next.
    apps = [client_app(url, name=f"bench-embed-{i}") for i in range(CLIENTS)]
    small = {"cpu_cores": 0.05, "memory": "256MB"}  # 16 fit the bench node's 8GB at once
    rates: dict[str, list[float]] = {}
    batch_sizes: dict[str, int] = {}
    try:
        for label, batch in (("one per pass", 1), ("batched", 32)):
            worker = start_worker("hypha_celery", url, workdir, concurrency=CLIENTS,
                                  config=hypha_config(models, max_concurrent_tasks=CLIENTS,
                                                      batching={"max_batch_size": batch}))
            try:
                wait_ready(worker, apps[0])
                # the first request loads the model (under a larger reservation); a round warms the threads
                apps[0].send_task("hypha.infer", kwargs={"model": model, "texts": [SENTENCES[0]],
                                                         "requirements": {"cpu_cores": 0.05, "memory": "1GB"}}
                                  ).get(timeout=300)
                _clients(apps, model, small, 2)
                measured = [_clients(apps, model, small, per_client) for _ in range(REPEATS)]
            finally:
                worker.stop()
            rates[label] = [rate for rate, _ in measured]
            batch_sizes[label] = max(largest for _, largest in measured)
    finally:
        for app in apps:
            app.close()
    ratio = statistics.median(rates["batched"]) / statistics.median(rates["one per pass"])
    for label, runs in rates.items():
        say(f"    worker, {label:13} {fmt(runs, 'embeddings/s')}  (largest batch {batch_sizes[label]})")
    say(f"    ratio {ratio:.2f} (target >= 3)")
    record("embeddings_batched", ratio=ratio, target=">= 3", met=ratio >= 3, unit="batched/unbatched embeddings per s",
           model=model, clients=CLIENTS, requests_per_client=per_client,
           one_per_pass=spread(rates["one per pass"]), batched=spread(rates["batched"]),
           largest_batch=batch_sizes["batched"])


def _clients(apps: list[Any], model: str, requirements: dict[str, Any], count: int) -> tuple[float, int]:
    """Embeddings per second with every app's thread sending ``count`` requests, each waited for; largest batch."""
    start = threading.Barrier(len(apps) + 1)
    sizes: list[int] = []
    errors: list[BaseException] = []

    def client(index: int, app: Any) -> None:
        start.wait()
        try:
            for n in range(count):
                text = SENTENCES[(index + n) % len(SENTENCES)]
                result = app.send_task("hypha.infer", kwargs={"model": model, "texts": [text],
                                                              "requirements": requirements}).get(timeout=300)
                sizes.append(result["metrics"]["batch_size"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i, app), daemon=True) for i, app in enumerate(apps)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"an embedding request failed: {errors[0]!r}")
    return len(apps) * count / elapsed, max(sizes)


def bench_generation_batched(url: str, workdir: Path, models: Path) -> None:
    from hypha_celery.models.examples import TINY_LLAMA

    if not (models / TINY_LLAMA).is_dir():
        say("\n[7] generation: skipped (no tiny-llama example; install the [hf] extra)")
        return
    say(f"\n[7] generation: {GENERATIONS} greedy requests ({TINY_LLAMA}, {NEW_TOKENS} new tokens) sent together "
        "vs one after another")
    app = client_app(url, name="bench-generate")
    worker = start_worker("hypha_celery", url, workdir, concurrency=GENERATIONS,
                          config=hypha_config(models, max_concurrent_tasks=GENERATIONS))
    requirements = {"cpu_cores": 0.1, "memory": "512MB"}

    def kwargs(prompt: str) -> dict[str, Any]:
        return {"model": TINY_LLAMA, "prompt": prompt, "max_new_tokens": NEW_TOKENS, "do_sample": False,
                "requirements": requirements}

    def sequential() -> tuple[float, list[dict[str, Any]]]:
        started = time.perf_counter()
        results = [app.send_task("hypha.generate", kwargs=kwargs(p)).get(timeout=300) for p in PROMPTS]
        return _tokens(results) / (time.perf_counter() - started), results

    def together() -> tuple[float, list[dict[str, Any]]]:
        started = time.perf_counter()
        pending = [app.send_task("hypha.generate", kwargs=kwargs(p)) for p in PROMPTS]
        results = [p.get(timeout=300) for p in pending]
        return _tokens(results) / (time.perf_counter() - started), results

    try:
        wait_ready(worker, app)
        app.send_task("hypha.generate", kwargs={**kwargs(PROMPTS[0]), "requirements": {"cpu_cores": 0.1,
                                                                                       "memory": "1GB"}}
                      ).get(timeout=300)  # loads the model
        seq: list[float] = []
        con: list[float] = []
        texts_equal = True
        batch = 1
        for _ in range(REPEATS):
            rate, alone = sequential()
            seq.append(rate)
            rate, batched = together()
            con.append(rate)
            texts_equal &= [r["output"]["text"] for r in alone] == [r["output"]["text"] for r in batched]
            batch = max(batch, *(r["metrics"].get("batch_size", 1) for r in batched))
    finally:
        worker.stop()
        app.close()
    ratio = statistics.median(con) / statistics.median(seq)
    say(f"    sequential    {fmt(seq, 'tokens/s')}")
    say(f"    concurrent    {fmt(con, 'tokens/s')}  (largest batch {batch}; same texts as sequential: "
        f"{'yes' if texts_equal else 'NO'})")
    say(f"    ratio {ratio:.2f} (target >= 3)")
    record("generation_batched", ratio=ratio, target=">= 3", met=ratio >= 3, unit="concurrent/sequential completion tokens per s",
           requests=GENERATIONS, max_new_tokens=NEW_TOKENS, sequential=spread(seq), concurrent=spread(con),
           largest_batch=batch, same_texts=texts_equal)


def _tokens(results: list[dict[str, Any]]) -> int:
    return sum(r["output"]["usage"]["completion_tokens"] for r in results)


def bench_cold_load_largest(models: Path) -> None:
    import torch

    from hypha_celery.models.store import ModelStore
    from hypha_celery.runtimes.registry import load

    store = ModelStore(models)
    largest = max(store.list(), key=lambda model_id: store.manifest(model_id).size)
    manifest = store.manifest(largest)
    files = [store.path(largest) / name for name in manifest.files]
    say(f"\n[8] cold load of the largest example model ({largest}, {manifest.size / 2**20:.0f} MiB in {len(files)} "
        "files) vs reading its bytes")
    torch.set_num_threads(1)  # as in an executor pinned to one core
    load(ModelStore(models).open(largest), "cpu")  # imports the runtime (transformers) once, as a worker's first model does
    reads, loads = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for path in files:
            path.read_bytes()
        reads.append(time.perf_counter() - t0)
        fresh = ModelStore(models)  # nothing cached; the stamp spares the sha256, as in a worker's cold load
        t0 = time.perf_counter()
        loaded = load(fresh.open(largest), "cpu")
        loads.append(time.perf_counter() - t0)
        del loaded
    ratio = statistics.median(reads) / statistics.median(loads)
    say(f"    read          {fmt(reads, 'ms', 1000)}")
    say(f"    cold load     {fmt(loads, 'ms', 1000)}  (stamp check, private view, build, weights, tokenizer)")
    say(f"    read / load = {ratio:.2f} (target >= 0.5: loading costs at most twice reading)")
    record("cold_load_largest", ratio=ratio, target=">= 0.5", met=ratio >= 0.5, unit="file read time / cold load time",
           model=largest, bytes=manifest.size, read_s=spread(reads), load_s=spread(loads))


def bench_first_request(url: str, workdir: Path, models: Path) -> None:
    """Start-to-ready and the first request after ``ready`` against a warm one: executors started on demand
    (``prewarm = false``) vs at boot with the model preloaded."""
    from hypha_celery.models.examples import MINILM, TINY_EMBEDDER

    model = MINILM if (models / MINILM).is_dir() else TINY_EMBEDDER
    say(f"\n[10] first request after ready ({model}): executors started on first use vs at boot with preload")
    app = client_app(url, name="bench-first")
    kwargs = {"model": model, "texts": [SENTENCES[0]], "requirements": {"cpu_cores": 0.5, "memory": "1GB"}}

    def latency() -> float:
        started = time.perf_counter()
        app.send_task("hypha.infer", kwargs=kwargs).get(timeout=300)
        return time.perf_counter() - started

    figures: dict[str, dict[str, float]] = {}
    for label, execution, preload in (("on first use", {"prewarm": False}, []),
                                      ("at boot", {"prewarm": True}, [model])):
        ready_s, first, warm = [], [], []
        for _ in range(REPEATS):
            started = time.perf_counter()
            config = hypha_config(models, execution=execution)
            config["models"] = {**config["models"], "preload": preload}
            worker = start_worker("hypha_celery", url, workdir, config=config)
            try:
                wait_ready(worker, app)
                ready_s.append(time.perf_counter() - started)
                first.append(latency())
                warm.append(statistics.median(latency() for _ in range(5)))
            finally:
                worker.stop()
        figures[label] = {"ready_s": statistics.median(ready_s), "first_s": statistics.median(first),
                          "warm_s": statistics.median(warm)}
        say(f"    executors {label:13} start to ready {figures[label]['ready_s']:6.2f} s, first request "
            f"{figures[label]['first_s'] * 1000:7.1f} ms, warm {figures[label]['warm_s'] * 1000:6.1f} ms")
    app.close()
    boot = figures["at boot"]
    ratio = boot["first_s"] / boot["warm_s"]
    say(f"    first / warm with executors started at boot = {ratio:.2f} (target <= 2; the model is preloaded)")
    record("first_request", ratio=ratio, target="<= 2", met=ratio <= 2, unit="first request after ready / warm request",
           **{label.replace(" ", "_"): values for label, values in figures.items()})
