"""Step 18, token_stream: what a client reading a generation as it grows costs Redis, stream vs ``PROGRESS`` polling.

One worker, the tiny Llama warm in its cache, one greedy generation at a time, read two ways:

* **stream**: the client reads the task's token stream (:mod:`hypha_celery.token_stream`) with
  blocking ``XREAD``, as :func:`hypha_celery.client.stream` does;
* **PROGRESS polling**: the client reads the task's state every ``POLL_S`` (what ``run generate``
  did before the stream).

Redis commands are counted exactly with ``MONITOR`` and attributed by key: the stream's are those
on the task's stream key (the worker's ``XADD``/``EXPIRE``, the client's ``XREAD``); the
``PROGRESS`` path's are the worker's ``PROGRESS`` state writes (one ``EVALSHA`` round trip each,
:mod:`hypha_celery.worker.backend`; the ``GET``/``SETEX``/``PUBLISH`` it runs inside Redis counted
apart), its ``task-progress`` events (a ``PUBLISH`` each) and the client's reads of the state. Both
paths run in both runs (the worker writes ``PROGRESS`` for Flower either way); each run counts the
path its client uses. The delay is from the executor's clock when an entry's newest token came
(the entry's ``t``) to the client's receipt, same host, same clock; for polling, to the first read
whose text reaches that entry's end (the polling run's stream tells when each piece was generated).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.common import REPEATS, hypha_config, record, say, start_worker, wait_ready
from hypha_celery import keys
from hypha_celery.harness.launch import client_app
from hypha_celery.harness.redis_monitor import monitored
from hypha_celery.token_stream import End, Tokens, read

__all__ = ["bench_token_stream"]

NEW_TOKENS = 200
POLL_S = 0.05  # the old `run generate` loop's pause between state reads
PROMPT = "Once upon a time"


def _monitored(url: str, run: Callable[[], Any]) -> tuple[Any, list[tuple[str, str]]]:
    """``run()``'s value and every command Redis saw meanwhile, as (client type, command line)."""
    with monitored(url) as commands:
        value = run()
    return value, [(c["client_type"], c["command"]) for c in commands]


def _stream_commands(seen: list[tuple[str, str]], task_id: str) -> dict[str, int]:
    key = keys.token_stream(task_id)
    counts: dict[str, int] = {}
    for kind, line in seen:
        if kind != "lua" and key in line:
            name = line.split(" ", 1)[0].lower()
            counts[name] = counts.get(name, 0) + 1
    return counts


def _progress_commands(seen: list[tuple[str, str]], task_id: str) -> dict[str, int]:
    meta = f"celery-task-meta-{task_id}"
    counts = {"state_writes": 0, "in_scripts": 0, "events": 0, "client_reads": 0}
    writing = False  # the commands a PROGRESS write's script runs follow its EVALSHA
    for kind, line in seen:
        name = line.split(" ", 1)[0].lower()
        if kind == "lua":
            counts["in_scripts"] += writing
            continue
        writing = False
        if name in ("evalsha", "eval") and meta in line and "PROGRESS" in line:
            counts["state_writes"] += 1
            writing = True
        elif name == "publish" and "task.progress" in line:
            counts["events"] += 1
        elif name in ("get", "mget") and meta in line:
            counts["client_reads"] += 1
    return counts


def bench_token_stream(url: str, workdir: Path, models: Path) -> None:
    from hypha_celery.models.examples import TINY_LLAMA

    if not (models / TINY_LLAMA).is_dir():
        say("\n[18] token_stream: skipped (no tiny-llama example; install the [hf] extra)")
        return
    say(f"\n[18] token_stream: a client reading a {NEW_TOKENS}-token greedy generation ({TINY_LLAMA}) as it grows: "
        f"stream (XREAD BLOCK) vs PROGRESS polling every {POLL_S * 1000:.0f} ms")
    app = client_app(url, name="bench-token-stream")
    worker = start_worker("hypha_celery", url, workdir, concurrency=2, config=hypha_config(models))
    kwargs = {"model": TINY_LLAMA, "prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "do_sample": False,
              "requirements": {"cpu_cores": 1, "memory": "1GB"}}
    stream_per_token: list[float] = []
    progress_per_token: list[float] = []
    delays: list[float] = []
    progress_delays: list[float] = []
    detail: dict[str, Any] = {}
    try:
        wait_ready(worker, app)
        app.send_task("hypha.generate", kwargs={**kwargs, "max_new_tokens": 2}).get(timeout=300)  # loads the model
        reader = redis.Redis.from_url(url)
        for _ in range(REPEATS):
            pending = app.send_task("hypha.generate", kwargs=kwargs)

            def by_stream(task_id: str = pending.id) -> str:
                text = ""
                for entry in read(reader, keys.token_stream(task_id), timeout=300):
                    if isinstance(entry, Tokens):
                        delays.append(time.time() - entry.at)
                        text += entry.text
                    elif isinstance(entry, End):
                        break
                return text

            streamed, seen = _monitored(url, by_stream)
            answer = pending.get(timeout=300)
            tokens = answer["output"]["usage"]["completion_tokens"]
            if streamed != answer["output"]["text"]:
                raise SystemExit("token_stream: the streamed text is not the result's text")
            counts = _stream_commands(seen, pending.id)
            stream_per_token.append(sum(counts.values()) / tokens)
            detail["stream_by_command"] = {name: round(n / tokens, 3) for name, n in counts.items()}

            polled = app.send_task("hypha.generate", kwargs=kwargs)

            def by_polling(result: Any = polled) -> list[tuple[float, int]]:
                shown: list[tuple[float, int]] = []  # when the client saw how many characters
                while True:
                    meta = result.backend.get_task_meta(result.id)  # one read: state and text together
                    if meta["status"] == "PROGRESS":
                        shown.append((time.time(), len(meta["result"].get("text", ""))))
                    elif meta["status"] in ("SUCCESS", "FAILURE"):
                        shown.append((time.time(), 1 << 62))
                        return shown
                    time.sleep(POLL_S)

            shown, seen = _monitored(url, by_polling)
            tokens = polled.get(timeout=300)["output"]["usage"]["completion_tokens"]
            for entry in read(reader, keys.token_stream(polled.id), timeout=10):  # when each piece was generated
                if isinstance(entry, Tokens) and entry.text:
                    end = entry.offset + len(entry.text)
                    progress_delays.append(next(t for t, chars in shown if chars >= end) - entry.at)
                elif isinstance(entry, End):
                    break
            counts = _progress_commands(seen, polled.id)
            round_trips = counts["state_writes"] + counts["events"] + counts["client_reads"]
            progress_per_token.append(round_trips / tokens)
            detail["progress_by_kind"] = {name: round(n / tokens, 3) for name, n in counts.items()}
        reader.close()
    finally:
        worker.stop()
        app.close()
    stream_cost, progress_cost = statistics.median(stream_per_token), statistics.median(progress_per_token)
    delay_ms = statistics.median(delays) * 1000
    ratio = progress_cost / stream_cost if stream_cost else float("inf")
    say(f"    stream            {stream_cost:6.3f} Redis commands per token  {detail['stream_by_command']}")
    say(f"    PROGRESS polling  {progress_cost:6.3f} Redis commands per token  {detail['progress_by_kind']} "
        "(in_scripts: run inside the state writes' scripts, no round trip; not in the total)")
    progress_ms = statistics.median(progress_delays) * 1000
    say(f"    delay from a token's entry to the client: stream median {delay_ms:.1f} ms "
        f"(p90 {statistics.quantiles(delays, n=10)[-1] * 1000:.1f} ms, {len(delays)} entries); "
        f"PROGRESS polling median {progress_ms:.1f} ms (p90 {statistics.quantiles(progress_delays, n=10)[-1] * 1000:.1f} ms)")
    say(f"    ratio {ratio:.2f} PROGRESS-polling commands per stream command (target > 1)")
    record("token_stream", ratio=ratio, target="> 1", met=ratio > 1, unit="PROGRESS polling / stream Redis commands "
           "per generated token", stream_per_token=stream_cost, progress_per_token=progress_cost,
           median_delay_ms=delay_ms, progress_median_delay_ms=progress_ms, tokens=NEW_TOKENS, poll_s=POLL_S, **detail)
