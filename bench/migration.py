"""Step 22, migration: a generation whose worker is killed half way continues on another worker.

Two workers on one Redis (``lease_heartbeat`` 1 s): A decodes slowly on demand
(``HYPHA_TEST_DECODE_DELAY_S``, so the kill lands mid-generation), B holds the model warm.
A 300-token greedy generation goes to A's own queue; when its token stream holds about half of it,
A's process group gets SIGKILL. The sweeper hands the task to B, which continues after the tokens
the stream holds (:mod:`hypha_celery.stages.continuation`).

* **kill to next token**: from the kill to the stream entry of B's first token (the entry's ``t``, the
  executor's clock; same host, same clock). Target: at most 3 x ``lease_heartbeat`` plus B's model
  load time (the result's ``load_s``): the sweeper re-publishes a held message nobody touched for
  2 heartbeats, sweeping every half heartbeat.
* **tokens recomputed**: of the tokens the stream held at the kill, how many B computed again
  (``held - resumed_from_token``: 0 when it continues from the last durable token); and the tokens A
  made after its last stream write (the only ones lost with it: A's rate x the time from its last
  entry to the kill), which bound what any copy can recompute.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import REPEATS, hypha_config, record, say, start_worker, wait_ready
from hypha_celery import keys
from hypha_celery.harness.launch import client_app, wait_for
from hypha_celery.token_stream import Tokens, decode

__all__ = ["bench_migration"]

LONG = "tiny-llama-long"
NEW_TOKENS = 300
HEARTBEAT_S = 1.0
DELAY = {"HYPHA_TEST_DECODE_DELAY_S": "0.02"}


def _tokens(client: redis.Redis, task_id: str) -> list[Tokens]:
    return [e for e in (decode(i, f) for i, f in client.xrange(keys.token_stream(task_id))) if isinstance(e, Tokens)]


def bench_migration(url: str, workdir: Path, models: Path) -> None:
    from hypha_celery.models.examples import write_tiny_llama
    from hypha_celery.models.store import ModelStore

    say(f"\n[22] migration: a {NEW_TOKENS}-token greedy generation whose worker is killed (SIGKILL to its process "
        f"group) half way continues on another (lease_heartbeat {HEARTBEAT_S:g} s)")
    if not (models / LONG).is_dir():
        source = workdir / "long-src"
        source.mkdir(exist_ok=True)
        write_tiny_llama(source, positions=512)
        ModelStore(models).add("transformers", source, LONG)
    config = hypha_config(models, resources={"lease_heartbeat": HEARTBEAT_S})
    app = client_app(url, name="bench-migration")
    client = redis.Redis.from_url(url)
    kwargs = {"model": LONG, "prompt": "The cat sat on", "max_new_tokens": NEW_TOKENS}
    b = start_worker("hypha_celery", url, workdir, config=config)
    gaps: list[float] = []
    budgets: list[float] = []
    recomputed: list[int] = []
    lost: list[float] = []
    try:
        wait_ready(b, app)
        app.send_task("hypha.generate", kwargs={**kwargs, "max_new_tokens": 2},
                      queue=keys.worker_queue(f"{b.name}@{os.uname().nodename}")).get(timeout=300)  # B: model warm
        for _ in range(REPEATS):
            a = start_worker("hypha_celery", url, workdir, config=config, env=DELAY)
            wait_ready(a, app)
            moving = app.send_task("hypha.generate", kwargs=kwargs,
                                   queue=keys.worker_queue(f"{a.name}@{os.uname().nodename}"))
            wait_for(lambda m=moving: sum(len(e.ids) for e in _tokens(client, m.id)) >= NEW_TOKENS // 2, 300,
                     "half of the tokens", 0.02)
            a.kill9()
            killed = time.time()
            before = _tokens(client, moving.id)
            held = sum(len(e.ids) for e in before)
            result: dict[str, Any] = moving.get(timeout=300)
            after = _tokens(client, moving.id)
            first_b = next(e for e in after if e.worker == result["worker"])
            gaps.append(first_b.at - killed)
            budgets.append(3 * HEARTBEAT_S + float(result["metrics"]["load_s"]))
            recomputed.append(held - int(result["resumed_from_token"]))
            rate = held / max(1e-9, before[-1].at - before[0].at)  # A's tokens per second
            lost.append(rate * max(0.0, killed - before[-1].at))
    finally:
        b.stop()
        app.close()
        client.close()
    gap, budget = statistics.median(gaps), statistics.median(budgets)
    say(f"    kill to B's first token: median {gap:.2f} s (runs {', '.join(f'{g:.2f}' for g in gaps)}); "
        f"target <= 3 x lease_heartbeat + load = {budget:.2f} s")
    say(f"    tokens of the durable record computed again: {recomputed} (target 0); tokens A made after its last "
        f"stream write (lost with it, the bound): median {statistics.median(lost):.1f}")
    ratio = gap / budget
    record("migration", ratio=ratio, target="<= 1", met=ratio <= 1 and max(recomputed) <= 0,
           unit="kill to next token / (3 x lease_heartbeat + load_s)", kill_to_next_token_s=gaps,
           budget_s=budget, recomputed_durable_tokens=recomputed, lost_after_last_write=lost, tokens=NEW_TOKENS)
