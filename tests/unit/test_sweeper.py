"""What a worker touches: the reservations its consumer's channel holds (kombu's QoS, read from another thread)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from hypha_celery.worker.sweeper import held_tags


@pytest.fixture
def channel() -> Iterator[Any]:
    with Connection("memory://") as connection:
        channel = connection.channel()
        queue = Queue("q", Exchange("q"), "q")
        queue(channel).declare()
        for n in range(2):
            channel.basic_publish(channel.prepare_message(f"m{n}"), "q", "q")
        yield channel
        channel.close()


def test_held_tags_are_the_unacked_deliveries(channel: Any) -> None:
    # Given a consumer that received two messages and acked the first
    first, second = channel.basic_get("q", no_ack=False), channel.basic_get("q", no_ack=False)
    first.ack()
    consumer = SimpleNamespace(task_consumer=SimpleNamespace(channel=channel))
    # Then it holds only the second
    assert held_tags(consumer) == [str(second.delivery_tag)]


def test_a_consumer_without_a_channel_holds_nothing() -> None:
    # Given a consumer between connections (no task consumer yet)
    # Then it holds nothing, and reading it does not fail
    assert held_tags(SimpleNamespace(task_consumer=None)) == []
