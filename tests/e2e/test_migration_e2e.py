"""A generation outlives its worker: kill -9 the worker's process group half way through 300 tokens, and the copy
continues on another worker from the last streamed token (real workers, real Redis, a tiny Llama of 512 positions).

Worker A decodes slowly on demand (``HYPHA_TEST_DECODE_DELAY_S``) so the kill lands mid-generation; the tasks go
to A's own queue, so the sweeper's re-published copy is the only way they reach B. The reference for each text is
the same request run uninterrupted on B afterwards.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from hypha_celery import keys
from hypha_celery.client import stream
from hypha_celery.harness.launch import WorkerProcess, free_port, scrape, wait_for
from hypha_celery.models.examples import write_tiny_llama
from hypha_celery.models.store import ModelStore
from hypha_celery.token_stream import End, Tokens, decode
from tests.e2e.conftest import copy_store

LONG = "tiny-llama-long"
PROMPT = "The cat sat on"
SLOW = {"HYPHA_TEST_DECODE_DELAY_S": "0.02"}
SEEDED = {"do_sample": True, "temperature": 0.9, "top_k": 40, "seed": 5}


@pytest.fixture
def long_store(tmp_path: Path, model_dir: Path) -> Path:
    """The example store plus a tiny Llama with room for a prompt and 300 new tokens."""
    store = copy_store(model_dir, tmp_path / "store")
    source = tmp_path / "long-src"
    source.mkdir()
    write_tiny_llama(source, positions=512)
    ModelStore(store).add("transformers", source, LONG)
    return store


def worker_id(worker: WorkerProcess) -> str:
    return f"{worker.name}@{os.uname().nodename}"


def pair(start_worker: Callable[..., WorkerProcess], store: Path, b_args: tuple[str, ...] = (),
         b_metrics: int | None = None, batching: str = "continuous") -> tuple[WorkerProcess, WorkerProcess]:
    """A (slow decoding, where the tasks start) and B (the survivor, started with ``b_args``, its Prometheus metrics
    on port ``b_metrics``), both ready, both batching generations so."""
    overrides: dict[str, Any] = {"models": {"model_dir": str(store)}, "max_concurrent_tasks": 8,
                                 "generation": {"batching": batching}}
    a = start_worker(overrides, env=SLOW, wait=False)
    monitoring = {"monitoring": {"collect_metrics": True, "metrics_port": b_metrics}} if b_metrics else {}
    b = start_worker({**overrides, **monitoring}, wait=False, args=b_args)
    a.wait_ready(90)
    b.wait_ready(90)
    return a, b


def send(app: Any, worker: WorkerProcess, max_new_tokens: int, **kwargs: Any) -> Any:
    return app.send_task("hypha.generate", queue=keys.worker_queue(worker_id(worker)),
                         kwargs={"model": LONG, "prompt": PROMPT, "max_new_tokens": max_new_tokens, **kwargs})


def entries(client: redis.Redis, task_id: str) -> list[Tokens | End]:
    return [decode(i, f) for i, f in client.xrange(keys.token_stream(task_id))]


def held(client: redis.Redis, task_id: str) -> int:
    return sum(len(e.ids) for e in entries(client, task_id) if isinstance(e, Tokens))


def kill_when(client: redis.Redis, worker: WorkerProcess, task_ids: list[str], tokens: int) -> dict[str, int]:
    """kill -9 ``worker``'s process group once every task's stream holds ``tokens``; what each held just before."""
    wait_for(lambda: all(held(client, t) >= tokens for t in task_ids), 120, f"{tokens} streamed tokens", 0.02)
    worker.kill9()
    return {t: held(client, t) for t in task_ids}


def assert_whole_once(client: redis.Redis, task_id: str, text: str, completion_tokens: int, store: Path) -> None:
    """The stream numbers every token once, its text pieces join into ``text`` once, its ids decode to it."""
    from transformers import PreTrainedTokenizerFast

    tokens = [e for e in entries(client, task_id) if isinstance(e, Tokens)]
    assert [e.start for e in tokens] == [sum(len(x.ids) for x in tokens[:i]) for i in range(len(tokens))]
    assert [e.offset for e in tokens] == [sum(len(x.text) for x in tokens[:i]) for i in range(len(tokens))]
    assert "".join(e.text for e in tokens) == text
    ids = [i for e in tokens for i in e.ids]
    assert len(ids) == completion_tokens
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(store / LONG))
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def events(app: Any, kind: str) -> tuple[threading.Thread, list[dict[str, Any]]]:
    """The task events of ``kind`` (as Flower gets them), collected in a thread until the first; returns once the
    receiver hears a worker's heartbeat (it is listening)."""
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    def listen() -> None:
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={kind: seen.append,
                                                                 "worker-heartbeat": lambda _: ready.set()})
            with contextlib.suppress(TimeoutError, OSError):
                for _ in receiver.consume(limit=None, timeout=180, wakeup=False):  # after each event of any kind
                    if seen:
                        return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(60), "no worker heartbeat event: the receiver is not listening"
    return thread, seen


def live_reader(result: Any) -> tuple[threading.Thread, list[str]]:
    """A client streaming ``result`` from before the kill to its end (in a thread)."""
    pieces: list[str] = []
    thread = threading.Thread(target=lambda: pieces.extend(stream(result, timeout=240)), daemon=True)
    thread.start()
    return thread, pieces


@pytest.mark.parametrize(("sampling", "batching"), [({}, "continuous"), (SEEDED, "continuous"), ({}, "static")],
                         ids=["greedy", "seeded-sampled", "greedy-static-batching"])
def test_a_generation_killed_half_way_finishes_on_another_worker_from_its_last_streamed_token(
        start_worker, celery_client, redis_client: redis.Redis, long_store: Path, sampling: dict, batching: str) -> None:
    # Given two workers and a 300-token generation on A, streamed live by a client
    port = free_port()
    a, b = pair(start_worker, long_store, b_metrics=port, batching=batching)
    app = celery_client()
    moving = send(app, a, 300, **sampling)
    reader, pieces = live_reader(moving)
    # When A's whole process group is killed once about half of the tokens are out
    before = kill_when(redis_client, a, [moving.id], 150)[moving.id]
    result = moving.get(timeout=180)
    reader.join(60)
    # Then B finished it, continuing after the tokens the stream held (none of them computed again)
    assert result["worker"] == worker_id(b)
    assert result["workers"] == [worker_id(a), worker_id(b)]
    assert before <= result["resumed_from_token"] < 300 and "restarted" not in result
    # And the text is the uninterrupted run's (the same request, run on B alone)
    reference = send(app, b, 300, **sampling).get(timeout=180)
    assert result["output"]["text"] == reference["output"]["text"] and reference["resumed_from_token"] == 0
    assert result["output"]["usage"] == reference["output"]["usage"]
    # And the client's stream gave every token exactly once across the move
    assert not reader.is_alive() and "".join(pieces) == result["output"]["text"]
    assert_whole_once(redis_client, moving.id, result["output"]["text"],
                      result["output"]["usage"]["completion_tokens"], long_store)
    # And B's metrics count one continued generation and the tokens it did not compute again
    samples = scrape(port)
    assert samples['hypha_worker_generations_moved_total{outcome="continued"}'] == 1
    assert samples["hypha_worker_generation_tokens_resumed_total"] == result["resumed_from_token"]


def test_a_dead_workers_batch_of_8_is_continued_row_by_row(start_worker, celery_client, redis_client: redis.Redis,
                                                          long_store: Path) -> None:
    # Given eight generations (greedy and seeded) decoding in one continuous batch on A
    a, b = pair(start_worker, long_store)
    app = celery_client()
    settings = [{} if i % 2 else {**SEEDED, "seed": i} for i in range(8)]
    moving = [send(app, a, 160, **s) for s in settings]
    # When A is killed with every row part way
    kill_when(redis_client, a, [m.id for m in moving], 40)
    results = [m.get(timeout=240) for m in moving]
    # Then B continued each row from its own last streamed token, and each text is its uninterrupted run's
    references = [send(app, b, 160, **s) for s in settings]
    for m, result, reference in zip(moving, results, references, strict=True):
        assert result["worker"] == worker_id(b) and result["resumed_from_token"] >= 40
        assert result["output"]["text"] == reference.get(timeout=240)["output"]["text"]
        assert_whole_once(redis_client, m.id, result["output"]["text"],
                          result["output"]["usage"]["completion_tokens"], long_store)


def forge(client: redis.Redis, task_id: str) -> None:
    """What someone who can write the result backend (but holds no worker's key) could do: rewrite the record's
    tokens and drop the signatures."""
    key = keys.token_stream(task_id)
    entries = client.xrange(key)
    client.delete(key)
    for _, fields in entries:
        text = {k.decode(): v.decode() for k, v in fields.items() if k != b"sig"}
        text["ids"] = ",".join("7" for _ in text["ids"].split(",")) if text.get("ids") else ""
        client.xadd(key, text)


@pytest.mark.parametrize(("tamper", "reason"), [("deleted", "no token record"),
                                                ("forged", "not signed by its worker's registered identity")])
def test_a_copy_whose_record_is_gone_or_forged_starts_over_and_says_so(
        start_worker, celery_client, redis_client: redis.Redis, long_store: Path, tamper: str, reason: str) -> None:
    # Given a generation killed part way on A, whose token stream then disappears (expired, a Redis restarted) or
    # is rewritten by someone without A's key
    a, b = pair(start_worker, long_store, b_args=("-E",))  # B sends task events, as for Flower
    app = celery_client()
    listener, resumed = events(app, "task-resumed")
    moving = send(app, a, 120)
    kill_when(redis_client, a, [moving.id], 30)
    if tamper == "deleted":
        redis_client.delete(keys.token_stream(moving.id))
    else:
        forge(redis_client, moving.id)
    # When the copy runs on B
    result = moving.get(timeout=180)
    # Then it generated from the start, saying why (in its result, and in an event Flower shows)
    assert result["worker"] == worker_id(b) and result["resumed_from_token"] == 0
    assert reason in result["restarted"]
    listener.join(60)
    assert [(e["uuid"], e["from_token"]) for e in resumed] == [(moving.id, 0)]
    assert reason in resumed[0]["restarted"]
    # And its text is still the uninterrupted run's (nothing of the forged tokens in it)
    assert result["output"]["text"] == send(app, b, 120).get(timeout=180)["output"]["text"]
