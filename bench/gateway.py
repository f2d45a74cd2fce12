"""Bench step ``gateway``: what the OpenAI gateway adds to a request, and how soon a stream starts.

One worker holds the tiny Llama; one ``hypha-celery gateway`` (no keys, no rate limit)
fronts it. At one client, the same greedy chat request goes alternately straight
through :func:`hypha_celery.client.submit` and through the gateway over HTTP (a
kept-alive ``httpx`` client: the gateway is measured, not an SDK); the ratio of
their median latencies is the figure (target ≤ 1.1). Then the same request streams:
the delay to its first content chunk, against the whole non-streamed request's time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from bench.common import REPEATS, ROOT, fmt, hypha_config, record, say, start_worker, wait_ready
from hypha_celery.harness.launch import client_app, start_gateway, worker_env, write_worker_config

__all__ = ["bench_gateway"]

MESSAGES = [{"role": "user", "content": "The cat sat on"}]
ROUNDS = 10  # requests of each kind per repeat


def _gateway(url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = write_worker_config(workdir / "gateway.toml", {"gateway": {"rate_limit": 0}})
    try:
        return start_gateway(worker_env(url, url, url), workdir / "gateway.log", "--config", str(config), cwd=ROOT)
    except (RuntimeError, TimeoutError) as exc:
        raise SystemExit(f"bench gateway did not start: {exc}") from None


def bench_gateway(url: str, workdir: Path, models: Path) -> None:
    import httpx

    from hypha_celery.client import submit
    from hypha_celery.models.examples import TINY_LLAMA

    say("\n[19] gateway: a chat request through the OpenAI gateway vs a direct submit(), at one client")
    previous = os.environ.get("HYPHA_REGISTRY_URL")
    os.environ["HYPHA_REGISTRY_URL"] = url  # where submit() places the direct requests
    app = client_app(url)
    worker = start_worker("hypha_celery", url, workdir, config=hypha_config(models))
    gateway = None
    try:
        wait_ready(worker, app)
        gateway, base = _gateway(url, workdir)
        http = httpx.Client(timeout=120)
        body = {"model": TINY_LLAMA, "messages": MESSAGES, "temperature": 0, "max_tokens": 8}

        def direct() -> float:
            started = time.perf_counter()
            submit("hypha.generate", model=TINY_LLAMA, messages=MESSAGES, max_new_tokens=8, do_sample=False,
                   app=app).get(timeout=120)
            return time.perf_counter() - started

        def through() -> float:
            started = time.perf_counter()
            answer = http.post(f"{base}/chat/completions", json=body)
            answer.raise_for_status()
            return time.perf_counter() - started

        def first_chunk(max_tokens: int) -> tuple[float, float]:
            started = time.perf_counter()
            first = 0.0
            with http.stream("POST", f"{base}/chat/completions",
                             json={**body, "max_tokens": max_tokens, "stream": True}) as answer:
                for line in answer.iter_lines():
                    if not first and line.startswith("data: {") and json.loads(line[6:])["choices"] and \
                            json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - started
            return first, time.perf_counter() - started

        direct(), through()  # the model loads once, the connections open
        ratios, direct_s, gateway_s = [], [], []
        for _ in range(REPEATS):
            pairs = [(direct(), through()) for _ in range(ROUNDS)]
            d, g = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            direct_s.append(d)
            gateway_s.append(g)
            ratios.append(g / d)
        say(f"    direct submit()  {fmt(direct_s, 'ms', 1000)}")
        say(f"    through gateway  {fmt(gateway_s, 'ms', 1000)}")
        ratio = statistics.median(ratios)
        say(f"    gateway / direct: {ratio:.3f} (target <= 1.1)")
        record("gateway_latency", ratio=ratio, target="<= 1.1", met=ratio <= 1.1, unit="x",
               direct_ms=statistics.median(direct_s) * 1000, gateway_ms=statistics.median(gateway_s) * 1000)
        streamed = [first_chunk(64) for _ in range(REPEATS * 3)]
        firsts, wholes = [s[0] for s in streamed], [s[1] for s in streamed]
        share = statistics.median(f / w for f, w in streamed)
        say(f"    SSE first content chunk  {fmt(firsts, 'ms', 1000)}")
        say(f"    SSE whole 64-token reply {fmt(wholes, 'ms', 1000)}")
        say(f"    first chunk / whole reply: {share:.3f} (target < 1: text arrives before the end)")
        record("gateway_sse_first_chunk", ratio=share, target="< 1", met=share < 1, unit="x",
               first_chunk_ms=statistics.median(firsts) * 1000, whole_ms=statistics.median(wholes) * 1000)
        http.close()
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(15)
        worker.stop()
        if previous is None:
            os.environ.pop("HYPHA_REGISTRY_URL", None)
        else:
            os.environ["HYPHA_REGISTRY_URL"] = previous
