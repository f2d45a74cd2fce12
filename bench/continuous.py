"""Step 19, continuous: continuous batching measured through a real worker (``bench/serving.py``: in one process).

Each figure is a ratio of two things timed in the same run, on the tiny Llama warm in the serving
executor's cache, requests sent through Celery and read back as a client does:

* ``hol_ratio``: latency of a short request (8 new tokens) sent while a long one (240) generates, over
  the same request alone (static batching made it wait for the long one);
* ``ttft_ratio``: its time to the first streamed text (:func:`hypha_celery.client.stream`) under that
  load, over alone;
* ``mixed_ratio``: tokens/s of 12 requests of mixed lengths and settings (``bench.serving.mixed``) sent
  together, over the same 12 one after another;
* ``continuous_vs_static``: tokens/s of 32 such requests sent together to a worker with
  ``[worker.generation] batching = "continuous"`` over one with ``"static"``.

Requirements: ``cpu_cores = 0.1`` per request, so that all of them are admitted at once on a 2-core
machine (with the default whole core each, two run at a time and the rest wait in admission).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import REPEATS, RESULTS, hypha_config, record, say, start_worker, wait_ready
from bench.serving import Spec, mixed
from hypha_celery.harness.launch import client_app

__all__ = ["bench_continuous"]

REQUIREMENTS = {"cpu_cores": 0.1, "memory": "200MB"}
SHORT, LONG = 8, 240


def _kwargs(spec: Spec) -> dict[str, Any]:
    params = spec.params()
    params.pop("proof")
    return {"model": "tiny-llama", "prompt": spec.text, "requirements": REQUIREMENTS, **params}


def _short_request(app: Any) -> tuple[float, float]:
    """Seconds to the first streamed text and to the result of an 8-token greedy request."""
    from hypha_celery.client import stream

    started = time.perf_counter()
    result = app.send_task("hypha.generate", kwargs=_kwargs(Spec("The cat sat on", SHORT, {})))
    first = None
    for _ in stream(result, timeout=300):
        if first is None:
            first = time.perf_counter() - started
    result.get(timeout=300)
    done = time.perf_counter() - started
    return first if first is not None else done, done


def _under_load(app: Any) -> tuple[float, float]:
    """The short request's two times while a 240-token request generates (sent once it streams)."""
    long = app.send_task("hypha.generate", kwargs=_kwargs(Spec("Once upon a time", LONG, {})))
    while long.state != "PROGRESS" and not long.ready():
        time.sleep(0.02)
    times = _short_request(app)
    long.get(timeout=600)
    return times


def _tokens_per_s(app: Any, specs: list[Spec], together: bool) -> float:
    def run(spec: Spec) -> int:
        out = app.send_task("hypha.generate", kwargs=_kwargs(spec)).get(timeout=900)
        return int(out["output"]["usage"]["completion_tokens"])

    started = time.perf_counter()
    if together:
        with ThreadPoolExecutor(len(specs)) as pool:
            tokens = sum(pool.map(run, specs))
    else:
        tokens = sum(run(spec) for spec in specs)
    return tokens / (time.perf_counter() - started)


def _worker(url: str, workdir: Path, models: Path, batching: str) -> Any:
    config = hypha_config(models, max_concurrent_tasks=36, task_timeout=900, generation={"batching": batching})
    return start_worker("hypha_celery", url, workdir, concurrency=36, config=config)


def bench_continuous(url: str, workdir: Path, models: Path) -> None:
    if not (models / "tiny-llama").is_dir():
        say("\n[21] continuous: skipped (no tiny-llama example; install the [hf] extra)")
        return
    say(f"\n[21] continuous: continuous batching through a worker (tiny-llama, requirements {REQUIREMENTS})")
    app = client_app(url, name="bench-continuous")
    rates: dict[str, float] = {}
    for batching in ("continuous", "static"):
        worker = _worker(url, workdir, models, batching)
        try:
            wait_ready(worker, app)
            app.send_task("hypha.generate", kwargs=_kwargs(Spec("warm", 2, {}))).get(timeout=300)  # loads the model
            if batching == "continuous":
                alone = [_short_request(app) for _ in range(REPEATS)]
                loaded = [_under_load(app) for _ in range(REPEATS)]
                ttft = statistics.median(t for t, _ in loaded) / statistics.median(t for t, _ in alone)
                hol = statistics.median(d for _, d in loaded) / statistics.median(d for _, d in alone)
                say(f"    short request alone:       ttft {statistics.median(t for t, _ in alone):6.3f} s  "
                    f"latency {statistics.median(d for _, d in alone):6.3f} s")
                say(f"    beside a {LONG}-token one:   ttft {statistics.median(t for t, _ in loaded):6.3f} s  "
                    f"latency {statistics.median(d for _, d in loaded):6.3f} s")
                record("hol_ratio", ratio=hol, target="<= 3", met=hol <= 3, unit="x")
                record("ttft_ratio", ratio=ttft, target="<= 3", met=ttft <= 3, unit="x")
                together = _tokens_per_s(app, mixed(12), together=True)
                apart = _tokens_per_s(app, mixed(12), together=False)
                say(f"    12 mixed requests:         together {together:7.1f} tokens/s  one after another "
                    f"{apart:7.1f} tokens/s")
                record("mixed_ratio", ratio=together / apart, target=">= 2", met=together / apart >= 2,
                       unit="x", together_tokens_per_s=together, apart_tokens_per_s=apart)
            rates[batching] = _tokens_per_s(app, mixed(32), together=True)
            say(f"    32 mixed requests, {batching:10}: {rates[batching]:7.1f} tokens/s")
        finally:
            worker.stop()
    ratio = rates["continuous"] / rates["static"]
    record("continuous_vs_static", ratio=ratio, target=">= 5 on a GPU (reported on CPU)", met=ratio >= 1,
           unit="x", continuous_tokens_per_s=rates["continuous"], static_tokens_per_s=rates["static"])
    say("    " + "  ".join(f"{name} {RESULTS[name]['ratio']:.2f}" for name in
                             ("hol_ratio", "ttft_ratio", "mixed_ratio", "continuous_vs_static")))
