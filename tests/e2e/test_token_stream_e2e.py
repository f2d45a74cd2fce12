"""A generation's token stream through a real worker and Redis: whole, once, readable late, bounded, expiring."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from hypha_celery import keys
from hypha_celery.client import stream
from hypha_celery.errors import InvalidTask
from hypha_celery.models.examples import TINY_LLAMA
from hypha_celery.token_stream import End, Tokens, decode

SMALL = {"cpu_cores": 1, "memory": "1GB"}
PROMPT = "The cat sat on"


def _send(app: Any, **kwargs: object) -> Any:
    return app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "requirements": SMALL, "prompt": PROMPT,
                                                   **kwargs})


def _entries(client: redis.Redis, task_id: str) -> list[Tokens | End]:
    return [decode(entry_id, fields) for entry_id, fields in client.xrange(keys.token_stream(task_id))]


@pytest.fixture
def small_stream_nodes(redis_client: redis.Redis) -> Iterator[None]:
    """Redis trims a stream (MAXLEN ~) by whole nodes: nodes of 1 entry make the bound visible in a short run."""
    before = redis_client.config_get("stream-node-max-entries")["stream-node-max-entries"]
    redis_client.config_set("stream-node-max-entries", 1)
    yield
    redis_client.config_set("stream-node-max-entries", before)


def test_the_pieces_join_into_the_final_text_once_and_the_ids_are_its_tokens(start_worker, celery_client,
                                                                              redis_client: redis.Redis,
                                                                              model_dir: Path) -> None:
    # Given a worker whose executor already holds the model
    start_worker()
    app = celery_client()
    _send(app, max_new_tokens=2).get(timeout=120)
    # When a client streams a long generation while it runs
    pending = _send(app, max_new_tokens=200)
    pieces = list(stream(pending, timeout=120))
    output = pending.get(timeout=60)["output"]
    # Then the pieces, joined, are the final text, each character once
    assert "".join(pieces) == output["text"] and all(pieces)
    # And the stream's entries number the tokens without a gap or a repeat, and decode to that text
    entries = _entries(redis_client, pending.id)
    tokens = [entry for entry in entries if isinstance(entry, Tokens)]
    assert [entry.start for entry in tokens] == [sum(len(e.ids) for e in tokens[:i]) for i in range(len(tokens))]
    assert [entry.offset for entry in tokens] == [sum(len(e.text) for e in tokens[:i]) for i in range(len(tokens))]
    ids = [token for entry in tokens for token in entry.ids]
    assert len(ids) == output["usage"]["completion_tokens"]
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir / TINY_LLAMA))
    assert tokenizer.decode(ids, skip_special_tokens=True) == output["text"]
    # And it ends with one end entry saying SUCCESS, its last entry
    assert isinstance(entries[-1], End) and entries[-1].status == "SUCCESS"
    assert sum(isinstance(entry, End) for entry in entries) == 1


def test_a_finished_generation_is_streamed_from_its_start(start_worker, celery_client) -> None:
    # Given a generation that already finished
    start_worker()
    done = _send(celery_client(), max_new_tokens=24)
    text = done.get(timeout=120)["output"]["text"]
    # When a client streams it afterwards
    pieces = list(stream(done, timeout=30))
    # Then it reads the whole text from the stream's start, then ends
    assert "".join(pieces) == text and text


def test_a_failed_generation_raises_its_error_through_the_stream(start_worker, celery_client,
                                                                  redis_client: redis.Redis) -> None:
    # Given a worker, When a classifier is asked to generate and a client streams the task
    start_worker()
    pending = celery_client().send_task("hypha.generate", kwargs={"model": "tiny-bert-classifier", "prompt": "hi"})
    # Then the stream raises the task's error by its class, naming the task to use
    with pytest.raises(InvalidTask, match=r"hypha\.infer"):
        list(stream(pending, timeout=120))
    # And the stream's one entry is its end, saying FAILURE and the error's class
    (end,) = _entries(redis_client, pending.id)
    assert isinstance(end, End) and (end.status, end.error) == ("FAILURE", "InvalidTask")


def test_the_stream_is_trimmed_to_its_bound(start_worker, celery_client, redis_client: redis.Redis,
                                            small_stream_nodes: None) -> None:
    # Given a worker whose streams keep about 1 entry
    start_worker({"generation": {"stream_maxlen": 1}})
    # When a generation writes at least three (its first tokens, its last, its end)
    pending = _send(celery_client(), max_new_tokens=24)
    pending.get(timeout=120)
    info = redis_client.xinfo_stream(keys.token_stream(pending.id))
    # Then it holds at most the bound and one node of 1: the end, after tokens that are not the first ones
    assert info["length"] <= 1 + 1
    first, last = decode(*info["first-entry"]), decode(*info["last-entry"])
    assert isinstance(last, End) and last.status == "SUCCESS"
    assert isinstance(first, End) or first.start > 0


def test_the_stream_expires_with_the_result(start_worker, celery_client, redis_client: redis.Redis) -> None:
    # Given a finished generation
    start_worker()
    done = _send(celery_client(), max_new_tokens=8)
    done.get(timeout=120)
    # Then its stream expires when its result does (Celery's result_expires, a day here)
    stream_ttl = redis_client.ttl(keys.token_stream(done.id))
    result_ttl = redis_client.ttl(f"celery-task-meta-{done.id}")
    assert 0 < stream_ttl <= 86400 and abs(stream_ttl - result_ttl) <= 5
