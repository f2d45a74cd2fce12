"""Counted, not timed: Redis commands and round trips per task, and RabbitMQ messages per task.

Redis counts come from its own ``INFO``: ``commandstats`` (calls per command
name, including the commands Lua scripts and MULTI/EXEC blocks run) and
``stats`` (``total_reads_processed``: one read event per request a client sends
and waits on, so a pipeline or a MULTI/EXEC block sent at once is one round
trip; ``total_net_input_bytes`` / ``total_net_output_bytes``). RabbitMQ counts
come from the broker's global counters (``rabbit_global_counters``, read with
``rabbitmqctl eval``; the management plugin is not needed): messages clients
published, routed to a queue, delivered to consumers, acknowledged.

A figure per task is the difference between a run of ``2n`` tasks and a run of
``n`` (``(C(2n) - C(n)) / n``), so what a run costs once (the last idle poll, a
first subscription) cancels out; the median of ``HYPHA_BENCH_REPEATS`` such
figures is reported, the round trips' range beside it. Every reading is exact;
what still moves between runs is batching that depends on timing: Celery's
worker buffers task events and publishes each batch as one message at the next
turn of its event loop, and hypha's lease keeper returns every lease released
since it last woke in one call. The workers run with their time-driven work
turned down (no Celery heartbeat events; the hypha monitor, registry refresh and
lease renewal far apart), so what is left is what tasks cost. Both the sending
client and the worker are counted: a task's whole trip.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from bench.common import REPEATS, hypha_config, record, say, start_worker, wait_ready
from hypha_celery.harness.launch import WorkerProcess, client_app

__all__ = ["Counts", "RedisCounter", "bench_counts", "parse_rabbitmq_counters", "rabbitmq_counters"]

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
ROW = [5.0, 3.4, 1.5, 0.2]
_QUIET = {"monitoring": {"monitor_interval": 3600}, "network": {"advertisement_interval": 3600},
          "resources": {"lease_heartbeat": 600}}


@dataclass
class Counts:
    """Counters read at one moment, or the difference of two readings."""

    round_trips: float = 0
    bytes_in: float = 0
    bytes_out: float = 0
    commands: dict[str, float] = field(default_factory=dict)

    def __sub__(self, other: Counts) -> Counts:
        names = set(self.commands) | set(other.commands)
        diff = {name: self.commands.get(name, 0) - other.commands.get(name, 0) for name in names}
        return Counts(self.round_trips - other.round_trips, self.bytes_in - other.bytes_in,
                      self.bytes_out - other.bytes_out, {name: value for name, value in diff.items() if value})

    def per(self, n: float) -> dict[str, Any]:
        """Per unit of work: round trips, bytes each way, commands in all and by name (most first)."""
        commands = {name: value / n for name, value in sorted(self.commands.items(), key=lambda kv: (-kv[1], kv[0]))}
        return {"round_trips": self.round_trips / n, "total_commands": sum(commands.values()),
                "bytes_in": self.bytes_in / n, "bytes_out": self.bytes_out / n, "commands": commands}


class RedisCounter:
    """Exact Redis counters from ``INFO``, less what reading them costs (measured once, at construction)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        first = self.read()
        self.own = self.read() - first  # one reading: one round trip, two INFO commands, their bytes
        self._started: Counts | None = None

    def read(self) -> Counts:
        with self.client.pipeline(transaction=False) as pipe:  # both in one request: one round trip
            pipe.info("stats")
            pipe.info("commandstats")
            stats, commandstats = pipe.execute()
        return Counts(stats["total_reads_processed"], stats["total_net_input_bytes"], stats["total_net_output_bytes"],
                      {name.removeprefix("cmdstat_"): value["calls"] for name, value in commandstats.items()})

    def start(self) -> None:
        self._started = self.read()

    def stop(self) -> Counts:
        """What happened since :meth:`start`, without this counter's own readings."""
        if self._started is None:
            raise RuntimeError("RedisCounter.stop() before start()")
        return self.read() - self._started - self.own


def rabbitmq_counters() -> dict[str, int]:
    """RabbitMQ's AMQP 0-9-1 message counters now, read with ``rabbitmqctl eval`` (see :func:`parse_rabbitmq_counters`)."""
    code = ("maps:foreach(fun(L, C) -> maps:foreach(fun(K, V) -> io:format(\"~w ~w ~w~n\", "
            "[[V2 || {_, V2} <- L], K, V]) end, C) end, rabbit_global_counters:overview()).")
    out = subprocess.run(["rabbitmqctl", "eval", code], capture_output=True, text=True, timeout=60, check=True).stdout
    return parse_rabbitmq_counters(out)


def parse_rabbitmq_counters(text: str) -> dict[str, int]:
    """``[amqp091,rabbit_classic_queue] messages_delivered_total 7`` lines -> ``{"delivered": 7}``, summed over
    queue types; only AMQP 0-9-1's ``messages_*`` counters."""
    totals: dict[str, int] = {}
    for labels, name, value in re.findall(r"^\[([^\]]*)\] (\w+) (-?\d+)$", text, re.MULTILINE):
        if "amqp091" in labels.split(",") and name.startswith("messages_"):
            key = name.removeprefix("messages_").removesuffix("_total")
            totals[key] = totals.get(key, 0) + int(value)
    return totals


def _send(app: Any, name: str, kwargs: dict[str, Any], queue: str, n: int) -> None:
    results = [app.send_task(name, kwargs=kwargs, queue=queue) for _ in range(n)]
    for result in results:
        result.get(timeout=300)


def _differenced(measure: Callable[[int], Any], n: int) -> Any:
    """``(measure(2n) - measure(n)) / n``: what one more task costs, with each run's fixed costs cancelled."""
    once = measure(n)
    twice = measure(2 * n)
    if isinstance(once, Counts):
        return (twice - once).per(n)
    return {key: (twice.get(key, 0) - once.get(key, 0)) / n for key in twice}


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over repeated runs (commands by name too), with the round trips' range beside it."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            names = {name for run in runs for name in run[key]}
            inner = {name: statistics.median(run[key].get(name, 0) for run in runs) for name in names}
            out[key] = dict(sorted(inner.items(), key=lambda kv: (-kv[1], kv[0])))
        else:
            out[key] = statistics.median(run[key] for run in runs)
    if "round_trips" in out:
        out["round_trips_range"] = [min(run["round_trips"] for run in runs), max(run["round_trips"] for run in runs)]
    return out


def _quiet_worker(app: str, broker: str, backend: str, workdir: Path, *, config: dict[str, Any] | None = None,
                  queues: str | None = None) -> WorkerProcess:
    """A worker on 4 threads without Celery's heartbeat events (time-driven, not per task)."""
    return start_worker(app, backend, workdir, broker=broker, config=config, queues=queues,
                        args=("--without-heartbeat",))


def _kinds(models: Path) -> list[tuple[str, str, dict[str, Any], str, int]]:
    """(label, task, kwargs, queue, n) for each kind of task counted."""
    req = {"requirements": {"cpu_cores": 0.01, "memory": "1MB"}}
    return [
        ("plain Celery no-op", "plain.noop", {}, "plain", 100),
        ("hypha no-op", "hypha.noop", req, "hypha", 100),
        ("hypha infer (mlp)", "hypha.infer", {"model": "mlp", "inputs": [ROW], **req}, "hypha", 100),
        ("hypha train (mlp, 1 epoch)", "hypha.train",
         {"model": "mlp", "data": {"inputs": [ROW] * 8, "targets": [0] * 8}, "epochs": 1,
          "requirements": {"cpu_cores": 0.5, "memory": "64MB"}}, "hypha", 10),
    ]


def _amqp_url() -> tuple[str, str]:
    """The RabbitMQ to count on, or ``""`` and why not."""
    url = os.environ.get("HYPHA_TEST_AMQP_URL") or DEFAULT_AMQP_URL
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout=2).close()
    except OSError as exc:
        return "", f"no RabbitMQ at {parsed.hostname}:{parsed.port or 5672} ({exc})"
    if shutil.which("rabbitmqctl") is None:
        return "", "RabbitMQ answers but rabbitmqctl (to read its counters) is not on PATH"
    try:
        rabbitmq_counters()
    except (OSError, subprocess.SubprocessError) as exc:
        return "", f"rabbitmqctl cannot read the broker's counters ({exc})"
    return url, ""


def _table(rows: dict[str, dict[str, Any]]) -> None:
    say(f"    {'task':28} {'round trips (range)':>21} {'commands':>9} {'bytes in':>9} {'bytes out':>9}  commands by name")
    for label, row in rows.items():
        low, high = row["round_trips_range"]
        # connection set-up (HELLO, CLIENT) differs a little between two runs: per task it rounds to 0.00 or below
        shown = [(name, calls) for name, calls in row["commands"].items() if calls >= 0.005]
        names = ", ".join(f"{name} {calls:.2f}" for name, calls in shown[:10])
        say(f"    {label:28} {row['round_trips']:6.2f} ({low:5.2f}-{high:5.2f}) {row['total_commands']:9.2f} "
            f"{row['bytes_in']:9.0f} {row['bytes_out']:9.0f}  {names}")


def _run_kinds(broker: str, url: str, workdir: Path, models: Path, *, amqp: bool) -> dict[str, dict[str, Any]]:
    """Every kind's per-task counts on ``broker`` (results and registry on the Redis at ``url``)."""
    app = client_app(broker, url, name="bench-counts")
    config = hypha_config(models, **_QUIET)
    plain = _quiet_worker("bench.plain_app", broker, url, workdir, queues="plain")
    hypha = _quiet_worker("hypha_celery", broker, url, workdir, config=config)
    counter = RedisCounter(redis.Redis.from_url(url))
    rows: dict[str, dict[str, Any]] = {}
    try:
        wait_ready(plain, app)
        wait_ready(hypha, app)
        for label, name, kwargs, queue, n in _kinds(models):
            _send(app, name, kwargs, queue, 3)  # warm: executors, model cache, subscriptions, scripts loaded

            def on_redis(count: int, name: str = name, kwargs: dict[str, Any] = kwargs, queue: str = queue) -> Counts:
                counter.start()
                _send(app, name, kwargs, queue, count)
                return counter.stop()

            rows[label] = _median_of([_differenced(on_redis, n) for _ in range(REPEATS)])
            if amqp:
                def on_rabbit(count: int, name: str = name, kwargs: dict[str, Any] = kwargs,
                              queue: str = queue) -> dict[str, int]:
                    before = rabbitmq_counters()
                    _send(app, name, kwargs, queue, count)
                    after = rabbitmq_counters()
                    return {key: after[key] - before.get(key, 0) for key in after}

                rows[label]["rabbitmq"] = _median_of([_differenced(on_rabbit, n) for _ in range(REPEATS)])
    finally:
        plain.stop()
        hypha.stop()
        counter.client.close()
        app.close()
    return rows


def bench_counts(url: str, workdir: Path, models: Path) -> None:
    """Step 11: per-task Redis round trips and commands (Redis broker), and messages per task on RabbitMQ."""
    say("\n[11] counted per task (exact, from Redis INFO commandstats/stats and RabbitMQ's counters; client + worker)")
    say("    Redis as broker, result backend and registry:")
    rows = _run_kinds(url, url, workdir, models, amqp=False)
    _table(rows)
    plain, noop = rows["plain Celery no-op"], rows["hypha no-op"]
    extra = noop["round_trips"] - plain["round_trips"]
    say(f"    hypha no-op's extra round trips over plain Celery: {extra:.2f} (target <= 1)")
    record("round_trips_noop", ratio=extra, target="<= 1 extra round trip", met=extra <= 1.0,
           unit="Redis round trips per task, hypha no-op - plain Celery no-op (INFO, client + worker)",
           **{label.replace(" ", "_"): row for label, row in rows.items()})
    for label, key in (("hypha infer (mlp)", "infer"), ("hypha train (mlp, 1 epoch)", "train")):
        record(f"round_trips_{key}", ratio=rows[label]["round_trips"] - plain["round_trips"], target="reported",
               met=True, unit=f"Redis round trips per task, hypha {key} - plain Celery no-op", **rows[label])

    amqp, why = _amqp_url()
    if not amqp:
        say(f"    RabbitMQ: skipped, {why}")
        return
    say(f"    RabbitMQ ({urlparse(amqp).hostname}) as broker, Redis as result backend and registry "
        "(messages: published by clients, routed to a queue, delivered, acknowledged):")
    rabbit = _run_kinds(amqp, url, workdir, models, amqp=True)
    _table(rabbit)
    for label, row in rabbit.items():
        m = row["rabbitmq"]
        say(f"    {label:28} messages published {m.get('received', 0):5.2f}  routed {m.get('routed', 0):5.2f}  "
            f"unroutable {m.get('unroutable_dropped', 0):5.2f}  delivered {m.get('delivered', 0):5.2f}  "
            f"acknowledged {m.get('acknowledged', 0):5.2f}")
    record("rabbitmq_messages_noop", ratio=rabbit["hypha no-op"]["rabbitmq"].get("received", 0), target="reported",
           met=True, unit="RabbitMQ messages published per hypha no-op task (plain Celery's beside it)",
           **{label.replace(" ", "_"): row for label, row in rabbit.items()})
