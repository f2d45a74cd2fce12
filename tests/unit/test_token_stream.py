"""The token stream's pure parts on fakeredis: what an entry holds, what a repeat adds, what a reader makes of it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import fakeredis
import nacl.signing
import pytest
import redis
from celery.exceptions import TimeoutError as ResultTimeout

from hypha_celery import errors
from hypha_celery.client import stream
from hypha_celery.keys import KeySchema
from hypha_celery.security import peer_id
from hypha_celery.token_stream import FAILURE, SUCCESS, End, Tokens, TokenStreams, decode, error_of, read

TASK = "task-1"


def _streams(maxlen: int = 100) -> TokenStreams:
    return TokenStreams(fakeredis.FakeRedis(), KeySchema("hypha"), maxlen=maxlen)


def _all(streams: TokenStreams) -> list[Tokens | End]:
    return [decode(i, f) for i, f in streams.client.xrange(streams.schema.token_stream(TASK))]


class _Result(SimpleNamespace):
    """What client.stream reads of an AsyncResult: its id, its backend's Redis client, whether it is ready."""

    def ready(self) -> bool:
        return bool(getattr(self, "done", False))


def test_each_report_writes_only_what_is_new_with_its_token_numbers_and_offset() -> None:
    # Given a writer
    streams = _streams()
    writer = streams.writer(TASK, expires=60)
    # When three cumulative reports come, the last one repeating the second
    for text, ids, start in (("Hel", [1, 2], 0), ("Hello w", [3, 4], 2), ("Hello w", [3, 4], 2)):
        if writer.add(0, text, ids, start, at=1.5):
            writer.flush()
    # Then two entries hold the new text and ids, numbered, and the repeat added none
    first, second = _all(streams)
    assert isinstance(first, Tokens) and (first.start, first.ids, first.offset, first.text) == (0, [1, 2], 0, "Hel")
    assert isinstance(second, Tokens) and (second.start, second.ids, second.offset, second.text) == (2, [3, 4], 3, "lo w")
    assert first.at == 1.5 and first.row == 0


def test_a_run_again_that_overlaps_writes_only_the_tokens_past_what_the_stream_holds() -> None:
    # Given a stream that holds 3 tokens of a row
    streams = _streams()
    writer = streams.writer(TASK, expires=None)
    writer.add(0, "abc", [1, 2, 3], 0)
    # When the task runs again from the start and reports 5 tokens
    writer.add(0, "abcde", [1, 2, 3, 4, 5], 0)
    writer.flush()
    # Then the second entry holds tokens 3 and 4 and the text past "abc" only
    _, again = _all(streams)
    assert isinstance(again, Tokens) and (again.start, again.ids, again.offset, again.text) == (3, [4, 5], 3, "de")


def test_text_that_stops_extending_the_stream_adds_no_more_text() -> None:
    # Given a stream with "abc"
    streams = _streams()
    writer = streams.writer(TASK, expires=None)
    writer.add(0, "abc", [1], 0)
    # When a report's text no longer starts with it (a sampled run again)
    writer.add(0, "xyz!", [9, 9], 0)
    writer.flush()
    # Then its new token is kept, its text is not
    _, other = _all(streams)
    assert isinstance(other, Tokens) and (other.ids, other.text) == ([9], "")


def test_the_end_entry_names_the_error_and_the_key_gets_the_results_expiry() -> None:
    # Given a writer with an expiry, When it flushes once and ends with an error
    streams = _streams()
    writer = streams.writer(TASK, expires=3600)
    writer.add(0, "a", [1], 0)
    writer.end(FAILURE, errors.TaskTimeout("ran past task_timeout"))
    writer.end(SUCCESS)  # a second end is not written
    # Then the last entry is the end with the error's class and message, and the key expires in an hour
    *_, end = _all(streams)
    assert isinstance(end, End) and (end.status, end.error, end.message) == (FAILURE, "TaskTimeout",
                                                                              "ran past task_timeout")
    assert sum(isinstance(e, End) for e in _all(streams)) == 1
    assert 3590 < streams.client.ttl(streams.schema.token_stream(TASK)) <= 3600


def test_a_writer_without_expiry_leaves_the_key_persistent() -> None:
    streams = _streams()
    writer = streams.writer(TASK, expires=0)
    writer.end(SUCCESS)
    assert streams.client.ttl(streams.schema.token_stream(TASK)) == -1


@pytest.mark.parametrize(("name", "expected"), [("InvalidInput", errors.InvalidInput),
                                                ("TaskTimeout", errors.TaskTimeout),
                                                ("ValueError", errors.ExecutionError),
                                                ("DuplicateTask", errors.ExecutionError)])
def test_an_end_entry_is_rebuilt_as_a_named_error(name: str, expected: type[Exception]) -> None:
    error = error_of(End(status=FAILURE, error=name, message="why"))
    assert type(error) is expected and "why" in str(error)


def test_client_stream_yields_each_character_once_and_ends_at_the_end_entry() -> None:
    # Given a finished stream whose task ran twice (the second run repeats the first's text, then goes on)
    streams = _streams()
    first = streams.writer(TASK, expires=None)
    first.add(0, "Hello", [1, 2], 0)
    first.flush()
    again = streams.writer(TASK, expires=None)
    again.add(0, "Hel", [1], 0)
    again.add(0, "Hello world", [1, 2, 3], 0)
    again.end(SUCCESS)
    # When a client streams it
    pieces = list(stream(_Result(id=TASK, backend=SimpleNamespace(client=streams.client)), timeout=5))  # type: ignore[arg-type]
    # Then the pieces join into the text, each character once
    assert "".join(pieces) == "Hello world"


def test_client_stream_raises_the_tasks_error_from_the_end_entry() -> None:
    streams = _streams()
    streams.writer(TASK, expires=None).end(FAILURE, errors.InvalidTask("no such task"))
    with pytest.raises(errors.InvalidTask, match="no such task"):
        list(stream(_Result(id=TASK, backend=SimpleNamespace(client=streams.client)), timeout=5))  # type: ignore[arg-type]


def test_client_stream_gives_up_after_its_timeout() -> None:
    # Given a task that never writes and never finishes
    streams = _streams()
    result: Any = _Result(id=TASK, backend=SimpleNamespace(client=streams.client))
    # Then stream raises Celery's TimeoutError, as result.get would
    with pytest.raises(ResultTimeout):
        list(stream(result, timeout=0.2))


def test_client_stream_refuses_a_backend_that_is_not_redis() -> None:
    result: Any = _Result(id=TASK, backend=SimpleNamespace())
    with pytest.raises(errors.ConfigError, match="result_backend"):
        list(stream(result, timeout=1))


def test_a_reader_asks_idle_when_nothing_comes_and_ends_with_its_answer() -> None:
    # Given an empty stream and an idle check that says the task ended
    client = fakeredis.FakeRedis()
    asked: list[int] = []

    def idle() -> End | None:
        asked.append(1)
        return End(status=SUCCESS, text="all of it")

    # When a reader reads it with short blocks
    entries = list(read(client, "hypha:task:x:tokens", timeout=5, block_s=0.05, idle=idle))
    # Then it asked once and ended with that end
    assert asked == [1] and entries == [End(status=SUCCESS, text="all of it")]


def test_after_a_failed_write_only_the_end_is_tried() -> None:
    # Given a writer whose Redis fails its first write
    streams = _streams()
    writer = streams.writer(TASK, expires=None)
    calls: list[int] = []
    real = streams.client.pipeline

    def broken_then_fine(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("down")
        return real(*args, **kwargs)

    streams.client.pipeline = broken_then_fine  # type: ignore[method-assign]
    # When two reports come and the task ends
    writer.add(0, "a", [1], 0)
    writer.flush()
    writer.add(0, "ab", [1, 2], 0)
    writer.flush()
    writer.end(SUCCESS)
    # Then the second report was not tried (one failed call, then the end's): the stream holds the end alone
    assert len(calls) == 2
    assert [type(e) for e in _all(streams)] == [End]


def _signed_run(identity: nacl.signing.SigningKey, worker: str = "w1") -> TokenStreams:
    streams = TokenStreams(fakeredis.FakeRedis(), KeySchema("hypha"), identity=identity,
                           peer=peer_id(identity.verify_key))
    writer = streams.writer(TASK, expires=None)
    writer.begin(worker, 1.0)
    writer.add(0, "Hello", [1, 2], 0)
    writer.flush()
    writer.add(0, "Hello world", [1, 2, 3], 0)
    writer.end(SUCCESS)
    return streams


def _stream_of(streams: TokenStreams, **options: Any) -> list[str]:
    return list(stream(_Result(id=TASK, backend=SimpleNamespace(client=streams.client)), timeout=5,  # type: ignore[arg-type]
                       **options))


def test_a_verifying_client_reads_a_stream_its_trusted_worker_signed() -> None:
    key = nacl.signing.SigningKey.generate()
    streams = _signed_run(key)
    assert "".join(_stream_of(streams, verify=True, allowed_workers=[peer_id(key.verify_key)])) == "Hello world"


@pytest.mark.parametrize("how", ["text changed", "unsigned", "untrusted key"])
def test_a_verifying_client_refuses_an_entry_its_worker_did_not_sign(how: str) -> None:
    # Given a signed stream that someone changed, or one that is signed by a key the client does not trust
    key = nacl.signing.SigningKey.generate()
    streams = _signed_run(key if how != "untrusted key" else nacl.signing.SigningKey.generate())
    name = streams.schema.token_stream(TASK)
    if how != "untrusted key":  # the stream rewritten in order, its second entry changed
        entries = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in streams.client.xrange(name)]
        if how == "text changed":
            entries[1]["text"] = " evil"
        else:
            entries[1].pop("sig")
        streams.client.delete(name)
        for fields in entries:
            streams.client.xadd(name, fields)
    # Then it raises InvalidSignature before yielding what was not signed
    pieces: list[str] = []
    with pytest.raises(errors.InvalidSignature):
        for piece in stream(_Result(id=TASK, backend=SimpleNamespace(client=streams.client)), timeout=5,  # type: ignore[arg-type]
                            verify=True, allowed_workers=[peer_id(key.verify_key)]):
            pieces.append(piece)
    assert "evil" not in "".join(pieces)


def test_a_failure_before_any_token_is_signed_and_names_its_worker() -> None:
    key = nacl.signing.SigningKey.generate()
    streams = TokenStreams(fakeredis.FakeRedis(), KeySchema("hypha"), identity=key, peer=peer_id(key.verify_key))
    writer = streams.writer(TASK, expires=None)
    writer.begin("w1", 1.0)
    writer.end(FAILURE, errors.InvalidTask("no such model"))
    with pytest.raises(errors.InvalidTask, match="no such model"):
        _stream_of(streams, verify=True, allowed_workers=[peer_id(key.verify_key)])


def test_only_errors_built_from_one_message_are_rebuilt_by_name() -> None:
    assert isinstance(errors.rebuilt("InvalidTask", "why"), errors.InvalidTask)
    assert errors.rebuilt("ConfigError", "key") is None  # configuration errors stay the worker's own
    assert errors.rebuilt("NotHere", "elsewhere") is None  # control flow never crosses a process
    assert errors.rebuilt("contained", "x") is None and errors.rebuilt("SystemExit", "x") is None
