"""Unit tests for refusing malformed messages (hypha_celery.worker.strategy), on kombu's memory transport."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from kombu import Connection

from hypha_celery.errors import MalformedMessage
from hypha_celery.worker.strategy import MessageGuardStep, refuse


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("strategy-test", backend="cache+memory://", set_as_current=False)
    yield app
    app.close()


@pytest.fixture
def connection() -> Iterator[Connection]:
    with Connection("memory://") as conn:
        yield conn


def received(conn: Connection, body: bytes, headers: dict[str, Any] | None) -> Any:
    """A real kombu message, as a consumer receives it (``body`` as is, not decoded)."""
    name = f"q-{uuid.uuid4().hex}"
    queue = conn.SimpleQueue(name, serializer=None)
    queue.producer.publish(body, routing_key=name, content_type="application/json", content_encoding="utf-8",
                           headers=headers or {}, serializer=None)
    message = conn.default_channel.basic_get(name)  # as a consumer gets it: the body not decoded
    assert message is not None
    return message


def consumer(app: Celery) -> Any:
    return SimpleNamespace(app=app, connection_errors=())


def test_a_refused_message_with_a_task_id_fails_by_name(app: Celery, connection: Connection,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # Given a message with task headers and a body that is no task
    task_id = str(uuid.uuid4())
    message = received(connection, b"{not json", {"id": task_id, "task": "hypha.infer"})
    # When it is refused
    with caplog.at_level(logging.WARNING, logger="hypha_celery.worker.strategy"):
        refuse(consumer(app), message, "the body cannot be decoded: DecodeError: nope\nsecond line")
    # Then its id has a final FAILURE with MalformedMessage, and the log has one line for it
    result = app.AsyncResult(task_id)
    assert result.state == "FAILURE" and isinstance(result.result, MalformedMessage)
    assert "malformed hypha.infer message: the body cannot be decoded" in str(result.result)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and task_id in lines[0] and "\n" not in lines[0]
    assert message.acknowledged


def test_a_refused_message_never_overwrites_a_final_state(app: Celery, connection: Connection) -> None:
    # Given a task id whose result is stored
    task_id = str(uuid.uuid4())
    app.backend.mark_as_done(task_id, {"output": 1})
    # When a malformed message arrives under that id
    refuse(consumer(app), received(connection, b"[1]", {"id": task_id, "task": "hypha.infer"}), "not a task body")
    # Then the stored result is unchanged
    assert app.AsyncResult(task_id).get(timeout=1) == {"output": 1}


@pytest.mark.parametrize("headers", [None, {"task": "hypha.infer"}, {"id": 7, "task": "hypha.infer"},
                                     {"id": "x" * 300, "task": "hypha.infer"}])
def test_a_message_without_a_usable_id_is_only_dropped(app: Celery, connection: Connection,
                                                       headers: dict[str, Any] | None) -> None:
    message = received(connection, b"{", headers)
    refuse(consumer(app), message, "the body cannot be decoded")
    assert message.acknowledged


def test_the_guard_step_replaces_the_consumers_handlers(app: Celery, connection: Connection) -> None:
    # Given a consumer with the guard step applied
    c = consumer(app)
    MessageGuardStep(c)
    # When a message for an unknown task arrives, Then its id fails with Celery's NotRegistered
    task_id = str(uuid.uuid4())
    c.on_unknown_task(None, received(connection, b"[[], {}, {}]", {"id": task_id, "task": "hypha.nosuch"}), KeyError())
    result = app.AsyncResult(task_id)
    assert result.state == "FAILURE" and type(result.result).__name__ == "NotRegistered"
    # ... and an undecodable one fails as MalformedMessage
    other = str(uuid.uuid4())
    c.on_decode_error(received(connection, b"\x80", {"id": other, "task": "hypha.infer"}), ValueError("bad"))
    assert isinstance(app.AsyncResult(other).result, MalformedMessage)
