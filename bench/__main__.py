"""``make bench``: every figure is a ratio of two things measured in this same run.

Absolute times are printed but never judged: machines are noisy, ratios less
so. Results go to ``bench/results.json`` with each ratio next to its target.
Redis is an embedded ``redis-server`` (``$HYPHA_BENCH_REDIS_URL`` to use
another; it must be a database the bench may flush).

``python -m bench --only 2,placement`` (or ``HYPHA_BENCH_ONLY=2,placement``)
runs only those steps, by number or name: 1 admission, 2 ledger, 3 placement
(:mod:`bench.scale`), 4 cache, 5 batching, 6 embeddings_batched, 7 generation_batched,
8 cold_load_largest, 10 first_request (these four in :mod:`bench.models`), 9 gpu
(:mod:`bench.gpu`; on a machine without an NVIDIA GPU it says so and measures nothing),
11 counts (Redis round trips and RabbitMQ messages per task, :mod:`bench.counts`),
12 registry (Redis memory per worker, a refresh's cost, :mod:`bench.scale`),
13 checkpoint (:mod:`bench.checkpoint`), 14 training and 15 adapter_switch (:mod:`bench.training`),
16 diloco (:mod:`bench.diloco`), 17 proofs (:mod:`bench.proofs`), 18 token_stream (:mod:`bench.token_stream`), 19 gateway (the
OpenAI gateway's latency over a direct submit, and its first streamed chunk, :mod:`bench.gateway`),
20 structured_output (:mod:`bench.structured`), 21 continuous (:mod:`bench.continuous`), 22 migration (a
generation continued on another worker after a kill -9, :mod:`bench.migration`).
``HYPHA_BENCH_REPEATS`` (default 3) runs of each figure; ``HYPHA_BENCH_TASKS``
(default 600) no-op tasks per admission run.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.checkpoint import bench_checkpoint_overhead
from bench.common import REPEATS, RESULTS, ROOT, fmt, hypha_config, record, say, spread, start_worker, throughput, wait_ready
from bench.continuous import bench_continuous
from bench.counts import bench_counts
from bench.diloco import bench_diloco
from bench.gateway import bench_gateway
from bench.migration import bench_migration
from bench.models import (
    bench_cold_load_largest,
    bench_embeddings_batched,
    bench_first_request,
    bench_generation_batched,
)
from bench.proofs import bench_proofs
from bench.scale import bench_placement, bench_registry
from bench.structured import bench_structured_output
from bench.token_stream import bench_token_stream
from bench.training import bench_adapter_switch, bench_training_throughput
from hypha_celery.harness.launch import client_app
from hypha_celery.harness.redis_monitor import monitored


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import celery
    import kombu
    import torch

    from hypha_celery.harness.embedded_redis import redis_server_binary

    server = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True).stdout.split()
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis-py": redis.__version__,
        "redis-server": next((w.split("=", 1)[1] for w in server if w.startswith("v=")), "?"),
        "torch": torch.__version__,
        "repeats": REPEATS,
    }


# --- 1. admission overhead ---------------------------------------------------------------------------

def commands_per_task(url: str, run: Callable[[int], Any], tasks: int = 200) -> dict[str, float]:
    """Redis commands per task while ``run(tasks)`` sends and waits for ``tasks`` tasks, read exactly with MONITOR.

    ``client``: commands clients sent (a MULTI ... EXEC block counted once, so it is the round trips,
    except that a pipeline without MULTI still counts per command: an upper bound); ``in_scripts``:
    commands the Lua scripts ran inside Redis (no round trip each); ``by_command``: the client commands by name.
    Both workers' idle broker polling (a BRPOP a second) is included.
    """
    with monitored(url) as commands:
        run(tasks)
    seen = [(c["client_type"], f"{c['client_address']}:{c['client_port']}", c["command"].split(" ", 1)[0].lower())
            for c in commands]
    in_transaction: set[str] = set()
    counted = scripted = 0
    by_command: dict[str, float] = {}
    for kind, source, name in seen:
        if kind == "lua":
            scripted += 1
            continue
        if name in ("monitor", "ping") or (source in in_transaction and name not in ("exec", "discard")):
            continue
        if name == "multi":
            in_transaction.add(source)
        elif name in ("exec", "discard"):
            in_transaction.discard(source)
            continue
        counted += 1
        by_command[name] = by_command.get(name, 0) + 1 / tasks
    return {"client": counted / tasks, "in_scripts": scripted / tasks,
            **{f"by_command.{name}": round(value, 3) for name, value in by_command.items()}}


def bench_admission(url: str, workdir: Path, models: Path) -> None:
    say("\n[1] admission overhead: no-op tasks/s, hypha's full path vs plain Celery (same broker, 4 threads)")
    app = client_app(url, name="bench-client")
    plain = start_worker("bench.plain_app", url, workdir, queues="plain")
    # the same plain app on hypha's broker transport: hypha's no-op beside it is admission's own cost
    plain_ht = start_worker("bench.plain_app_hypha_transport", url, workdir, queues="plain-hypha-transport")
    hypha = start_worker("hypha_celery", url, workdir, config=hypha_config(models))
    try:
        for worker in (plain, plain_ht, hypha):
            wait_ready(worker, app)
        count = int(os.environ.get("HYPHA_BENCH_TASKS", "600"))
        req = {"requirements": {"cpu_cores": 0.01, "memory": "1MB"}}
        kinds = {  # label: (worker, task, kwargs, queue)
            "plain Celery": (plain, "plain.noop", {}, "plain"),
            "plain, hypha's transport": (plain_ht, "plain.noop", {}, "plain-hypha-transport"),
            "hypha": (hypha, "hypha.noop", req, "hypha"),
        }
        for _, name, kwargs, queue in kinds.values():  # warm each
            throughput(app, name, kwargs, 50, queue)
        runs: dict[str, list[float]] = {label: [] for label in kinds}
        cpu: dict[str, list[float]] = {label: [] for label in kinds}  # the worker's CPU s per task: steadier
        for _ in range(max(5, REPEATS)):  # median of 5, interleaved, in the same run
            for label, (worker, name, kwargs, queue) in kinds.items():
                runs[label].append(_with_cpu(worker.pid, cpu[label], count,
                                             functools.partial(throughput, app, name, kwargs, count, queue)))
        plain_runs, hypha_runs = runs["plain Celery"], runs["hypha"]
        ratio = statistics.median(hypha_runs) / statistics.median(plain_runs)
        cpu_ratio = statistics.median(cpu["hypha"]) / statistics.median(cpu["plain Celery"])
        own = statistics.median(hypha_runs) / statistics.median(runs["plain, hypha's transport"])
        own_cpu = statistics.median(cpu["hypha"]) / statistics.median(cpu["plain, hypha's transport"])
        for label in kinds:
            say(f"    {label:25} {fmt(runs[label], 'tasks/s')}   worker CPU {fmt(cpu[label], 'us/task', 1e6)}")
        say(f"    ratio {ratio:.3f} (target >= 0.90); the worker's CPU per task, hypha / plain = {cpu_ratio:.3f} "
            "(reported: steadier than the rate on a shared machine)")
        say(f"    admission's own cost: hypha / plain on hypha's broker transport = {own:.3f} (worker CPU {own_cpu:.3f}; "
            "reported: the transport's one client per pool saves both the same)")
        plain_cmds = commands_per_task(url, lambda n: throughput(app, "plain.noop", {}, n, "plain"))
        hypha_cmds = commands_per_task(url, lambda n: throughput(app, "hypha.noop", req, n, "hypha"))
        for label, cmds in (("plain Celery", plain_cmds), ("hypha", hypha_cmds)):
            names = {k.removeprefix("by_command."): v for k, v in cmds.items() if k.startswith("by_command.")}
            top = ", ".join(f"{name} {calls:.2f}" for name, calls in sorted(names.items(), key=lambda kv: -kv[1])[:9])
            say(f"    Redis round trips per task, {label:12} {cmds['client']:6.2f}; inside scripts "
                f"{cmds['in_scripts']:5.2f}  ({top})")
        extra = hypha_cmds["client"] - plain_cmds["client"]
        say(f"    hypha's extra round trips per task: {extra:.2f} (MONITOR; MULTI/EXEC counted once; idle polling "
            "included)")
        record("admission_overhead", ratio=ratio, target=">= 0.90", met=ratio >= 0.90, unit="hypha/plain tasks per s",
               plain=spread(plain_runs), hypha=spread(hypha_runs), tasks=count, worker_cpu_ratio=cpu_ratio,
               plain_on_hypha_transport=spread(runs["plain, hypha's transport"]),
               admission_own_ratio=own, admission_own_worker_cpu_ratio=own_cpu,
               worker_cpu_s={label: spread(values) for label, values in cpu.items()},
               commands_per_task={"plain": plain_cmds, "hypha": hypha_cmds, "extra": extra})
    finally:
        for worker in (plain, plain_ht, hypha):
            worker.stop()
        app.close()


def _with_cpu(pid: int, per_task: list[float], count: int, run: Callable[[], float]) -> float:
    """``run()``'s result; appends the CPU seconds per task the process ``pid`` (and its children) used meanwhile."""
    import psutil

    def used() -> float:
        process = psutil.Process(pid)
        total = 0.0
        for each in [process, *process.children(recursive=True)]:
            try:
                times = each.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    before = used()
    result = run()
    per_task.append((used() - before) / count)
    return result


# --- 2. ledger -----------------------------------------------------------------------------------------

def bench_ledger(url: str) -> None:
    from hypha_celery.resources.ledger import Capacity, Lease, Ledger
    from hypha_celery.resources.requirements import Requirements

    say("\n[2] ledger: reserve+release pairs/s vs Redis PING/s from the same client")
    client = redis.Redis.from_url(url)
    ledger = Ledger(client, f"bench-ledger-{uuid.uuid4().hex[:6]}", ttl=30)
    ledger.set_capacity(Capacity(cores=list(range(8)), memory=64 * 2**30, gpus={0: 80 * 10**9, 1: 80 * 10**9}))
    req = Requirements(cpu_milli=500, memory=2**30, gpus=1, gpu_memory=10**9)
    n = 3000
    pings, pairs = [], []
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(n):
            client.ping()
        pings.append(n / (time.perf_counter() - started))
        started = time.perf_counter()
        for _ in range(n):
            lease = ledger.reserve(req, holder="bench", task_id=None)
            assert isinstance(lease, Lease)
            ledger.release(lease)
        pairs.append(n / (time.perf_counter() - started))
    before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    for _ in range(n):
        ledger.release(ledger.reserve(req, holder="bench"))
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    commands = (stats.get("calls", 0) - before) / n
    round_trips = statistics.median(pings) / statistics.median(pairs)
    say(f"    PING          {fmt(pings, 'per s')}")
    say(f"    reserve+release {fmt(pairs, 'pairs per s')}")
    say(f"    a pair takes the time of {round_trips:.2f} PINGs (target <= 2); on the wire it is {commands:.2f} "
        f"commands (EVALSHA), {stats.get('usec_per_call', 0):.1f} us each inside Redis")
    record("ledger_pair_cost", ratio=round_trips, target="<= 2 round trips", met=round_trips <= 2.0,
           unit="PING round trips per reserve+release pair", ping_per_s=spread(pings), pairs_per_s=spread(pairs),
           commands_per_pair=commands, redis_usec_per_script=stats.get("usec_per_call"))
    client.close()


# --- 4. model cache ------------------------------------------------------------------------------------

def bench_cache(workdir: Path) -> None:
    import torch

    from hypha_celery.formats.builtin import build
    from hypha_celery.manifest import WEIGHTS
    from hypha_celery.models.cache import ModelCache
    from hypha_celery.models.store import ModelStore
    from hypha_celery.runtimes.registry import load

    say("\n[4] model cache: warm-hit overhead over calling the model; cold load vs reading the bytes")
    torch.set_num_threads(1)
    store = ModelStore(workdir / "cache-models")
    config = {"in_features": 512, "hidden": 2048, "layers": 6, "out_features": 10}
    torch.manual_seed(0)
    store.add("builtin", build("mlp", config), "big", architecture="mlp", config=config, input_shape=[512])
    cache = ModelCache(2**31, lambda key: load(store.open(key), "cpu"))
    with cache.use("big") as use:
        model = use.value.module
    x = torch.randn(1, 512)
    n = 2000
    direct, cached = [], []
    with torch.inference_mode():
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(n):
                model(x)
            direct.append((time.perf_counter() - t0) / n * 1e6)
            t0 = time.perf_counter()
            for _ in range(n):
                with cache.use("big") as use:
                    use.value.module(x)
            cached.append((time.perf_counter() - t0) / n * 1e6)
    overhead = statistics.median(cached) - statistics.median(direct)
    say(f"    model call    {fmt(direct, 'us')}")
    say(f"    via cache     {fmt(cached, 'us')}")
    say(f"    warm-hit overhead {overhead:.1f} us (target < 50 us)")
    record("cache_warm_hit", ratio=statistics.median(cached) / statistics.median(direct), target="overhead < 50 us",
           met=overhead < 50, unit="cached call / direct call", overhead_us=overhead, direct_us=spread(direct),
           cached_us=spread(cached))
    path = store.path("big") / WEIGHTS
    size = path.stat().st_size
    reads, loads = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        path.read_bytes()
        reads.append(time.perf_counter() - t0)
        fresh = ModelStore(store.root)  # no remembered verification: sha256 every time, as a cold load does
        t0 = time.perf_counter()
        load(fresh.open("big"), "cpu")
        loads.append(time.perf_counter() - t0)
    ratio = statistics.median(loads) / statistics.median(reads)
    say(f"    read {size / 2**20:.0f} MiB {fmt(reads, 'ms', 1000)}")
    say(f"    cold load     {fmt(loads, 'ms', 1000)}  (sha256 verify + safetensors + build)")
    say(f"    cold load / read = {ratio:.2f} (reported, no target)")
    record("cache_cold_load", ratio=ratio, target="reported", met=True, unit="cold load time / file read time",
           bytes=size, read_s=spread(reads), load_s=spread(loads))


# --- 5. batching ---------------------------------------------------------------------------------------

def bench_batching(url: str, workdir: Path, models: Path) -> None:
    from hypha_celery.executor.pool import ExecutorPool
    from hypha_celery.executor.process import ExecutorSettings
    from hypha_celery.resources.ledger import Lease

    say("\n[5] dynamic batching: same-model small-model inference, batched vs one at a time")
    lease = Lease(id="bench", node="bench", memory=256 * 2**20, cores={0: 50}, gpus={}, exclusive_gpu=False)
    row = [5.0, 3.4, 1.5, 0.2]
    n, threads = 2000, 32

    def pool_rate(batch: int) -> float:
        pool = ExecutorPool(ExecutorSettings(store=str(models), cache_size=10**9, max_model_size=10**9, sandbox=True,
                                             nice=0, enforce_memory=True, enforce_cpu=True, max_batch_size=batch,
                                             max_queue_delay_s=0.002))
        try:
            pool.infer(model="mlp", inputs=[row], lease=lease, timeout=60, batchable=True)
            done = threading.Semaphore(0)

            def client(count: int) -> None:
                for _ in range(count):
                    pool.infer(model="mlp", inputs=[row], lease=lease, timeout=60, batchable=True)
                done.release()

            started = time.perf_counter()
            for _ in range(threads):
                threading.Thread(target=client, args=(n // threads,), daemon=True).start()
            for _ in range(threads):
                done.acquire()
            return (n // threads * threads) / (time.perf_counter() - started)
        finally:
            pool.close()

    isolation(models, lease, row)
    single, batched = [], []
    for _ in range(REPEATS):
        single.append(pool_rate(1))
        batched.append(pool_rate(32))
    ratio = statistics.median(batched) / statistics.median(single)
    say(f"    executor, one per pass   {fmt(single, 'inferences/s')}")
    say(f"    executor, batched (<=32) {fmt(batched, 'inferences/s')}")
    say(f"    ratio {ratio:.2f} (target >= 5)")
    record("batching_executor", ratio=ratio, target=">= 5", met=ratio >= 5, unit="batched/unbatched inferences per s",
           single=spread(single), batched=spread(batched), clients=threads)

    app = client_app(url, name="bench-client")
    end_to_end = {}
    for label, batch in (("one per pass", 1), ("batched", 32)):
        worker = start_worker("hypha_celery", url, workdir, concurrency=32,
                              config=hypha_config(models, max_concurrent_tasks=32, batching={"max_batch_size": batch}))
        try:
            wait_ready(worker, app)
            kwargs = {"model": "mlp", "inputs": [row], "requirements": {"cpu_cores": 0.05, "memory": "8MB"}}
            throughput(app, "hypha.infer", kwargs, 50, "hypha")
            end_to_end[label] = [throughput(app, "hypha.infer", kwargs, 600, "hypha") for _ in range(REPEATS)]
        finally:
            worker.stop()
    app.close()
    e2e = statistics.median(end_to_end["batched"]) / statistics.median(end_to_end["one per pass"])
    for label, runs in end_to_end.items():
        say(f"    worker, {label:16} {fmt(runs, 'tasks/s')}")
    say(f"    end-to-end ratio {e2e:.2f} (Celery's own per-task cost bounds it; reported)")
    record("batching_end_to_end", ratio=e2e, target="reported", met=True, unit="batched/unbatched tasks per s",
           **{label.replace(" ", "_"): spread(runs) for label, runs in end_to_end.items()})


def isolation(models: Path, lease: Any, row: list[float]) -> None:
    """What process isolation costs one request: through the serving executor vs a call in process."""
    import torch

    from hypha_celery.executor.pool import ExecutorPool
    from hypha_celery.executor.process import ExecutorSettings
    from hypha_celery.models.store import ModelStore
    from hypha_celery.runtimes.registry import load

    pool = ExecutorPool(ExecutorSettings(store=str(models), cache_size=10**9, max_model_size=10**9, sandbox=True,
                                         nice=0, enforce_memory=True, enforce_cpu=True, max_batch_size=1,
                                         max_queue_delay_s=0.0))
    n = 500
    try:
        pool.infer(model="mlp", inputs=[row], lease=lease, timeout=60, batchable=True)
        isolated = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(n):
                pool.infer(model="mlp", inputs=[row], lease=lease, timeout=60, batchable=True)
            isolated.append((time.perf_counter() - t0) / n * 1e6)
    finally:
        pool.close()
    loaded, _ = load(ModelStore(models).open("mlp"), "cpu")
    direct = []
    with torch.inference_mode():
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(n):
                loaded.module(torch.tensor([row]))
            direct.append((time.perf_counter() - t0) / n * 1e6)
    cost = statistics.median(isolated) - statistics.median(direct)
    say(f"    one request via the serving executor {fmt(isolated, 'us')}")
    say(f"    the same model called in process     {fmt(direct, 'us')}")
    say(f"    isolation costs {cost:.0f} us per request (JSON over a socket, limits, cache lookup); reported")
    record("isolation_cost", ratio=statistics.median(isolated) / statistics.median(direct), target="reported", met=True,
           unit="executor request / in-process call", cost_us=cost, executor_us=spread(isolated), direct_us=spread(direct))


# --- main ----------------------------------------------------------------------------------------------

def selection(argv: list[str]) -> set[str]:
    """The steps ``--only a,b`` (or ``$HYPHA_BENCH_ONLY``) names, by number or name; empty for all."""
    only = os.environ.get("HYPHA_BENCH_ONLY", "")
    for index, arg in enumerate(argv):
        if arg == "--only" and index + 1 < len(argv):
            only = argv[index + 1]
        elif arg.startswith("--only="):
            only = arg.removeprefix("--only=")
        elif arg.startswith("-") and arg != "--only":
            raise SystemExit(f"unknown option {arg!r}; python -m bench --help lists the options")
    return {part.strip() for part in only.split(",") if part.strip()}


def bench_gpu() -> None:
    from bench import gpu

    say("\n[9] GPU: batched inference and generation on cuda through the serving executor")
    for name, figure in gpu.run(say).items():
        record(name, **figure)


def main() -> int:
    if {"-h", "--help"} & set(sys.argv[1:]):
        say(__doc__ or "")
        return 0
    from hypha_celery.harness.embedded_redis import EmbeddedRedis
    from hypha_celery.models.examples import init_examples

    only = selection(sys.argv[1:])
    url, workdir = "", Path()  # set below: the steps read them when they run
    steps: list[tuple[int, str, Callable[[], None]]] = [  # numbered as printed; --only 2,placement picks some
        (2, "ledger", lambda: bench_ledger(url)),
        (3, "placement", lambda: bench_placement(url)),
        (4, "cache", lambda: bench_cache(workdir)),
        (8, "cold_load_largest", lambda: bench_cold_load_largest(workdir / "models")),
        (1, "admission", lambda: bench_admission(url, workdir, workdir / "models")),
        (5, "batching", lambda: bench_batching(url, workdir, workdir / "models")),
        (6, "embeddings_batched", lambda: bench_embeddings_batched(url, workdir, workdir / "models")),
        (7, "generation_batched", lambda: bench_generation_batched(url, workdir, workdir / "models")),
        (9, "gpu", bench_gpu),
        (10, "first_request", lambda: bench_first_request(url, workdir, workdir / "models")),
        (11, "counts", lambda: bench_counts(url, workdir, workdir / "models")),
        (12, "registry", lambda: bench_registry(url, workdir / "models")),
        (13, "checkpoint", lambda: bench_checkpoint_overhead(workdir)),
        (14, "training", lambda: bench_training_throughput(url, workdir, workdir / "models")),
        (15, "adapter_switch", lambda: bench_adapter_switch(workdir)),
        (16, "diloco", lambda: bench_diloco(url, workdir)),
        (17, "proofs", bench_proofs),
        (18, "token_stream", lambda: bench_token_stream(url, workdir, workdir / "models")),
        (19, "gateway", lambda: bench_gateway(url, workdir, workdir / "models")),
        (20, "structured_output", bench_structured_output),
        (21, "continuous", lambda: bench_continuous(url, workdir, workdir / "models")),
        (22, "migration", lambda: bench_migration(url, workdir, workdir / "models")),
    ]
    unknown = only - {str(number) for number, _, _ in steps} - {name for _, name, _ in steps}
    if unknown:
        raise SystemExit(f"no bench step {', '.join(sorted(unknown))}; the steps are "
                         + ", ".join(f"{number} {name}" for number, name, _ in sorted(steps)))
    server = None
    url = os.environ.get("HYPHA_BENCH_REDIS_URL", "")
    if not url:
        server = EmbeddedRedis()
        url = server.start()
    redis.Redis.from_url(url).flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="hypha-bench-"))
    init_examples(workdir / "models")
    info = machine()
    say("hypha-celery bench  " + "  ".join(f"{k}={v}" for k, v in info.items()))
    try:
        for number, name, step in steps:
            if only and str(number) not in only and name not in only:
                continue
            step()
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    say("\nsummary")
    say(f"    {'figure':22} {'ratio':>9}  {'target':20} met")
    for name, row in RESULTS.items():
        say(f"    {name:22} {row['ratio']:9.3f}  {row['target']:20} {'yes' if row['met'] else 'NO'}")
    out = ROOT / "bench" / "results.json"
    out.write_text(json.dumps({"machine": info, "results": RESULTS}, indent=2, sort_keys=True) + "\n")
    say(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
