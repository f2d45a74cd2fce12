"""One JSON meaning: a repeated object key is found where the raw text still shows it."""

from __future__ import annotations

import json

from hypha_celery.security.strict_json import DUPLICATE_HEADER, duplicate_key, mark_duplicates, response_checker


def test_a_repeated_key_is_named_at_any_depth() -> None:
    assert duplicate_key(b'[[], {"model": "mlp", "model": "cnn"}, {}]') == "model"
    assert duplicate_key('[[], {"a": {"x": 1, "x": 2}}, {}]') == "x"
    assert duplicate_key(b'[[], {"model": "mlp"}, {}]') is None
    assert duplicate_key(b"{not json") is None


def test_the_transport_marks_a_repeated_key_inside_the_envelope() -> None:
    # Given a transport message whose envelope names "id" twice
    raw = (b'{"body": "W10=", "headers": {"task": "hypha.infer", "id": "t1", '
           b'"hypha_envelope": {"id": "t1", "id": "t2", "requirements": null}}, "properties": {}}')
    # When the transport takes it, Then the header says where the duplicate was, and the rest is kept
    marked = json.loads(mark_duplicates(raw))
    assert marked["headers"][DUPLICATE_HEADER] == "hypha_envelope: id"
    assert marked["headers"]["hypha_envelope"]["id"] == "t2" and marked["body"] == "W10="


def test_the_transport_marks_a_repeated_header_as_the_message() -> None:
    raw = '{"body": "", "headers": {"id": "a", "id": "b", "hypha_envelope": {"requirements": {"x": 1}}}}'
    assert json.loads(mark_duplicates(raw))["headers"][DUPLICATE_HEADER] == "message: id"


def test_a_message_without_duplicates_is_returned_as_is() -> None:
    raw = b'{"body": "", "headers": {"id": "a"}}'
    assert mark_duplicates(raw) is raw
    assert mark_duplicates(b"not json") == b"not json"


def test_the_redis_callbacks_mark_brpop_and_rpop_replies() -> None:
    raw = b'{"headers": {"id": "a", "id": "b"}}'
    brpop = response_checker(lambda r, **_: tuple(r), pair=True)
    queue, message = brpop([b"hypha", raw])
    assert queue == b"hypha" and DUPLICATE_HEADER.encode() in message
    assert response_checker(None, pair=False)(raw) != raw
    assert response_checker(None, pair=False)(None) is None
