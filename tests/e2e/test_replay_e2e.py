"""Signed tasks through a real worker: a queue backlog is not an expiry, and a replay never runs twice.

* A task whose envelope expires while it waits behind a busy worker still runs: ``submit()``
  records its nonce as it sends it, and the expiry bounds that moment, not the moment a
  worker takes it from the queue.
* A finished task sent again under the same id runs no second time, even after its stored
  result was deleted: the nonce store remembers that it finished.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nacl.signing
import pytest
import redis

from hypha_celery import keys
from hypha_celery.client import submit
from hypha_celery.errors import InvalidSignature
from hypha_celery.harness.launch import wait_for
from hypha_celery.security import ENVELOPE_HEADER, NonceRecord, peer_id, signed_options

SMALL = {"cpu_cores": 0.1, "memory": "64MiB"}


def verifying(key: nacl.signing.SigningKey, **worker: Any) -> dict[str, Any]:
    return {**worker, "security": {"verify_task_signatures": True, "allowed_schedulers": [peer_id(key.verify_key)]}}


def test_a_signed_task_that_waited_in_the_queue_past_its_expiry_still_runs(
    start_worker: Callable[..., Any], celery_client: Callable[..., Any], redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a worker that runs one task at a time and verifies signatures, busy with a 6 s task
    monkeypatch.setenv("HYPHA_REGISTRY_URL", redis_url)  # where submit() records the nonces it sends
    key = nacl.signing.SigningKey.generate()
    start_worker(verifying(key, max_concurrent_tasks=1))
    app = celery_client()
    busy = submit("hypha.noop", signing_key=key, app=app, queue="hypha", requirements=SMALL, hold_s=6)
    # When a task whose envelope lives 2 s is sent behind it
    waiting = submit("hypha.noop", signing_key=key, app=app, queue="hypha", requirements=SMALL, envelope_ttl=2)
    # Then it runs once the busy one is done, after its envelope expired
    first = busy.get(timeout=60)
    done = waiting.get(timeout=60)
    recorded = _record_of(redis.Redis.from_url(redis_url), key, waiting.id)  # what submit() wrote as it sent it
    assert recorded.seen is not None
    assert done["metrics"]["started_at"] >= first["metrics"]["finished_at"] > recorded.seen + 2
    assert waiting.state == "SUCCESS"


def _record_of(client: redis.Redis, key: nacl.signing.SigningKey, task_id: str) -> NonceRecord:
    """The nonce record submit() wrote for ``task_id`` (the test does not see the envelope itself)."""
    for name in client.scan_iter(keys.nonce(peer_id(key.verify_key), "*")):
        record = NonceRecord.loads(client.get(name) or b"")
        if record.task == task_id:
            return record
    raise AssertionError(f"submit() recorded no nonce for {task_id}")


def test_a_finished_task_sent_again_after_its_result_was_deleted_does_not_run_again(
    start_worker: Callable[..., Any], celery_client: Callable[..., Any], redis_client: redis.Redis,
) -> None:
    # Given a signed task that ran and finished
    key = nacl.signing.SigningKey.generate()
    worker = start_worker(verifying(key))
    app = celery_client()
    kwargs = {"requirements": SMALL}
    message = {"name": "hypha.noop", "kwargs": kwargs, "queue": "hypha",
               **signed_options(key, "hypha.noop", kwargs=kwargs)}
    first = app.send_task(**message)
    assert first.get(timeout=60)["worker"]
    envelope = message["headers"][ENVELOPE_HEADER]
    stored = keys.nonce(envelope["key_id"], envelope["nonce"])
    # (the nonce is marked finished just after the result is stored)
    wait_for(lambda: NonceRecord.loads(redis_client.get(stored) or b"").done, 10, "the nonce to be marked finished")
    # When its result is deleted and the identical message is sent again
    assert redis_client.delete(app.backend.get_key_for_task(first.id)) == 1
    again = app.send_task(**message)
    # Then it is refused as a replay, and nothing ran a second time
    with pytest.raises(InvalidSignature, match="replayed"):
        again.get(timeout=60)
    assert worker.output().count(f"{first.id}] succeeded") == 1


def test_a_copy_of_a_finished_task_whose_result_is_stored_is_dropped_quietly(
    start_worker: Callable[..., Any], celery_client: Callable[..., Any],
) -> None:
    # Given a signed task that ran and finished, its result stored
    key = nacl.signing.SigningKey.generate()
    worker = start_worker(verifying(key))
    app = celery_client()
    kwargs = {"requirements": SMALL}
    message = {"name": "hypha.noop", "kwargs": kwargs, "queue": "hypha",
               **signed_options(key, "hypha.noop", kwargs=kwargs)}
    first = app.send_task(**message).get(timeout=60)
    # When the identical message comes again (a redelivery, or a replay), followed by another task
    app.send_task(**message)
    app.send_task("hypha.noop", kwargs=kwargs, queue="hypha",
                  **signed_options(key, "hypha.noop", kwargs=kwargs)).get(timeout=60)
    # Then the copy is dropped and the stored result is still the first run's
    task_id = message["task_id"]
    wait_for(lambda: f"task {task_id} already finished" in worker.output(), 30, "the worker to drop the copy")
    assert app.AsyncResult(task_id).get(timeout=5) == first
