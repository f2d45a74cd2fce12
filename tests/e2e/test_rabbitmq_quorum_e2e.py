"""RabbitMQ as the broker, with the shared queue declared as a quorum queue (``shared_queue_type = "quorum"``).

Needs ``$HYPHA_TEST_AMQP_URL`` (skipped with a reason when unset; CI sets it). Results
and the registry stay on Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from amqp.exceptions import NotFound, PreconditionFailed
from kombu import Connection

from hypha_celery.config import celery_settings, parse_config
from tests.e2e.test_worker_e2e import ROWS, direct

QUORUM = {"network": {"shared_queue_type": "quorum"}}


def _drop_shared_queue(amqp_url: str) -> None:
    """Delete ``hypha``: RabbitMQ refuses to declare a queue again with another type (classic <-> quorum)."""
    with Connection(amqp_url) as conn:
        channel = conn.channel()
        try:
            channel.queue_delete("hypha")
        finally:
            channel.close()


@pytest.fixture
def quorum_broker(amqp_url: str) -> Iterator[str]:
    """The broker with no ``hypha`` queue before and after (other tests declare it classic).

    Ask for it before ``start_worker``: fixtures are torn down in reverse, so the queue is deleted
    after the worker stopped (a live consumer would declare it again at once).
    """
    _drop_shared_queue(amqp_url)
    yield amqp_url
    _drop_shared_queue(amqp_url)


def _queue_type(amqp_url: str) -> str | None:
    """The shared queue's type (None when nobody declared it): a declare with its own type is the only one accepted."""
    with Connection(amqp_url) as conn:
        channel = conn.channel()
        try:
            channel.queue_declare("hypha", passive=True)  # it exists (else ChannelError 404)
        except NotFound:
            return None
    for kind in ("quorum", "classic"):
        with Connection(amqp_url) as conn:
            channel = conn.channel()
            try:
                # A non-passive declare with the same arguments is a no-op; with other arguments RabbitMQ
                # answers PRECONDITION_FAILED (406) and closes the channel.
                channel.queue_declare("hypha", durable=True, auto_delete=False,
                                      arguments={"x-queue-type": kind})
                return kind
            except PreconditionFailed:  # the other type
                continue
    return None


def test_the_shared_queue_type_becomes_the_celery_setting() -> None:
    cfg = parse_config({"worker": QUORUM})
    assert celery_settings(cfg, environ={})["task_default_queue_type"] == "quorum"
    assert celery_settings(parse_config({}), environ={})["task_default_queue_type"] == "classic"


def test_tasks_run_over_rabbitmq_with_a_quorum_shared_queue(
    quorum_broker: str, start_worker, celery_client, model_dir: Path,
) -> None:
    # (quorum_broker comes first: set up before the worker, it is torn down after the worker stopped, so no
    # consumer declares the quorum queue again after it was deleted)
    # Given a worker and a scheduler configured with shared_queue_type = "quorum", on RabbitMQ
    # (3 GB of memory: two 2 GB tasks cannot run side by side)
    worker = start_worker({**QUORUM, "resources": {"memory": "3GB"}}, broker=quorum_broker)
    app = celery_client(broker=quorum_broker)
    app.conf.task_default_queue_type = "quorum"  # as a scheduler with the same TOML gets it
    # Then the worker declared the shared queue as a quorum queue
    assert _queue_type(quorum_broker) == "quorum"
    # When an inference on the mlp model and two noops that cannot run side by side are sent
    infer = app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": ROWS})
    big = [app.send_task("hypha.noop", kwargs={"hold_s": 1.0, "requirements": {"memory": "2GB"}}) for _ in range(2)]
    # Then the model ran, and the noop that had to wait was deferred (a countdown on a quorum queue) and ran after
    result = infer.get(timeout=60)
    assert torch.allclose(torch.tensor(result["output"]), direct(model_dir, "mlp", ROWS), atol=1e-5)
    for sent in big:
        sent.get(timeout=90)
        assert sent.state == "SUCCESS"
    deferred = [line for line in worker.output().splitlines() if " deferred (attempt " in line]
    assert any(sent.id in line for sent in big for line in deferred), deferred
