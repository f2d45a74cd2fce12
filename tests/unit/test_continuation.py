"""What a copy of a generation continues from (hypha_celery.stages.continuation), read from its token stream
(token_stream.read_record) on fakeredis: every entry checked, since other workers wrote them."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import fakeredis
import nacl.signing
import pytest

from hypha_celery.errors import RegistryUnavailable
from hypha_celery.keys import KeySchema
from hypha_celery.security import peer_id
from hypha_celery.stages.continuation import FIRST_RUN, Continuation, plan
from hypha_celery.stages.results import Timing
from hypha_celery.tasks.generate import _resumption
from hypha_celery.tasks.pipeline import Run
from hypha_celery.token_stream import SUCCESS, Record, TokenStreams, TokenStreamWriter, decode
from hypha_celery.work import Generated

TASK = "task-1"
STATE = "cpu:AAAA"


def _streams() -> TokenStreams:
    return TokenStreams(fakeredis.FakeRedis(), KeySchema("hypha"))


def _run(streams: TokenStreams, worker: str, since: float, reports: list[tuple[str, list[int], int, str | None]],
         *, after: Record | None = None) -> TokenStreamWriter:
    """A run of the task on ``worker``: its reports (text so far, new ids, their start, rng), flushed one by one."""
    writer = streams.writer(TASK, expires=60)
    if after is not None:
        writer.resume(0, after.text, after.held)
    writer.begin(worker, since)
    for text, ids, start, rng in reports:
        writer.add(0, text, ids, start, rng=rng)
        writer.flush()
    return writer


def _entries(streams: TokenStreams) -> list:
    return [decode(i, f) for i, f in streams.client.xrange(streams.schema.token_stream(TASK))]


def test_a_dead_runs_stream_is_a_record_of_its_tokens_text_state_worker_and_start() -> None:
    # Given a run on w1 that streamed three reports (the last one's state kept) and then died
    streams = _streams()
    _run(streams, "w1", 1000.0, [("The", [5, 6], 0, "cpu:S1"), ("The cat", [7], 2, "cpu:S2"),
                                 ("The cat sat", [8, 9], 3, "cpu:S3")])
    # When a copy reads the record
    record = streams.record(TASK, max_tokens=100)
    # Then it holds every token in order, the text a reader has seen, the state after the last token, the worker
    assert record is not None and not record.refused
    assert record.ids == [5, 6, 7, 8, 9] and record.held == 5 and record.text == "The cat sat"
    assert (record.rng, record.rng_tokens) == ("cpu:S3", 5)
    assert record.workers == ("w1",) and record.since == 1000.0
    # And only the run's first entry named its worker
    assert [e.worker for e in _entries(streams)] == ["w1", "", ""]


def test_a_second_run_appends_only_after_what_the_stream_holds_and_names_itself_once() -> None:
    # Given a record of 3 tokens from w1
    streams = _streams()
    _run(streams, "w1", 1000.0, [("ab", [1, 2, 3], 0, None)])
    record = streams.record(TASK, max_tokens=100)
    assert record is not None
    # When w2 continues: its first report repeats nothing the stream holds, its next ones add
    _run(streams, "w2", 1000.0, [("abc", [4], 3, None), ("abcd", [5, 6], 4, None)], after=record)
    # Then the entries number the tokens without a repeat, the text pieces join once, both runs are named
    entries = _entries(streams)
    assert [(e.start, e.ids, e.offset, e.text) for e in entries] == [(0, [1, 2, 3], 0, "ab"), (3, [4], 2, "c"),
                                                                    (4, [5, 6], 3, "d")]
    again = streams.record(TASK, max_tokens=100)
    assert again is not None and again.ids == [1, 2, 3, 4, 5, 6] and again.workers == ("w1", "w2")


def test_a_state_that_lags_its_tokens_trims_the_resume_to_it() -> None:
    # Given a stream whose newest entry landed but whose state write did not (the worker died between)
    streams = _streams()
    _run(streams, "w1", 1.0, [("a", [1, 2], 0, "cpu:S2")])
    streams.client.xadd(streams.schema.token_stream(TASK), {"row": "0", "start": "2", "ids": "3,4", "offset": "1",
                                                            "text": "b", "t": "2.0"})
    record = streams.record(TASK, max_tokens=100)
    assert record is not None
    # Then a seeded sampled copy continues from the tokens its state belongs to; a greedy one from all of them
    seeded = plan(record, seeded_sampling=True)
    assert seeded.resume == [1, 2] and seeded.rng == "cpu:S2" and seeded.held_tokens == 4
    assert plan(record, seeded_sampling=False).resume == [1, 2, 3, 4]


@pytest.mark.parametrize(("fields", "reason"), [
    ({"row": "0", "start": "9", "ids": "3", "offset": "1", "text": "x", "t": "1"}, "missing"),
    ({"row": "0", "start": "2", "ids": "3,x", "offset": "1", "text": "x", "t": "1"}, "does not parse"),
    ({"row": "0", "start": "2", "ids": "3,-4", "offset": "1", "text": "x", "t": "1"}, "not one of this task's"),
    ({"row": "1", "start": "0", "ids": "3", "offset": "0", "text": "x", "t": "1"}, "not one of this task's"),
    ({"row": "0", "start": "2", "ids": ",".join(["7"] * 50), "offset": "1", "text": "x", "t": "1"}, "more than"),
    ({"end": SUCCESS, "t": "1"}, "already ended"),
])
def test_a_record_with_a_gap_a_bad_entry_or_too_many_tokens_is_refused_and_the_copy_starts_over(
        fields: dict, reason: str) -> None:
    # Given a stream a peer wrote: a good first entry, then a hostile or broken one
    streams = _streams()
    _run(streams, "w1", 1.0, [("a", [1, 2], 0, None)])
    streams.client.xadd(streams.schema.token_stream(TASK), fields)
    # When a copy reads it (it may produce at most 40 tokens)
    record = streams.record(TASK, max_tokens=40)
    assert record is not None
    cont = plan(record, seeded_sampling=False)
    # Then it continues from nothing, says why, and still knows what a reader has seen (so it repeats none of it)
    assert record.refused and reason in record.refused
    assert cont.resume == [] and cont.restarted is not None and reason in cont.restarted
    assert cont.held_text.startswith("a") and cont.held_tokens >= 2


def test_no_record_means_from_the_start_saying_so_and_a_seeded_run_without_state_restarts_exactly() -> None:
    streams = _streams()
    assert streams.record(TASK, max_tokens=10) is None
    gone = plan(None, seeded_sampling=False)
    assert gone.resume == [] and "no token record" in (gone.restarted or "")
    _run(streams, "w1", 1.0, [("a", [1, 2], 0, None)])
    record = streams.record(TASK, max_tokens=10)
    stateless = plan(record, seeded_sampling=True)
    assert stateless.resume == [] and "generator state" in (stateless.restarted or "") and stateless.held_tokens == 2


def test_a_state_naming_more_tokens_than_the_stream_holds_is_ignored() -> None:
    streams = _streams()
    _run(streams, "w1", 1.0, [("a", [1, 2], 0, None)])
    streams.client.set(streams.schema.token_rng(TASK), "5:" + STATE)
    record = streams.record(TASK, max_tokens=10)
    assert record is not None and record.rng_tokens == -1 and record.rng == ""
    streams.client.set(streams.schema.token_rng(TASK), "two:" + STATE)
    record = streams.record(TASK, max_tokens=10)
    assert record is not None and record.rng_tokens == -1


def test_a_continued_tasks_time_budget_counts_from_its_first_runs_admission() -> None:
    # Given a task_timeout of 100 s, a run admitted now, and an earlier run admitted 70 s ago
    now = time.time()
    ctx = SimpleNamespace(config=SimpleNamespace(task_timeout=100))
    run = Run(ctx, None, None, Timing(started_at=now), "w2")  # type: ignore[arg-type]
    assert 99 < run.remaining_s <= 100
    # When the run learns of the earlier one
    run.since = now - 70
    # Then only what is left of the first run's budget remains
    assert 29 < run.remaining_s <= 30


def test_the_result_says_who_took_part_and_why_a_copy_started_over() -> None:
    run = SimpleNamespace(worker="w2")
    out = Generated(text="t", finish_reason="length", prompt_tokens=1, completion_tokens=9)
    # A first run: from token 0, one worker, nothing restarted
    assert _resumption(run, FIRST_RUN, out) == {"resumed_from_token": 0, "workers": ["w2"]}  # type: ignore[arg-type]
    # A continued one
    cont = Continuation(resume=[1, 2, 3], workers=("w1",))
    moved = Generated(text="t", finish_reason="length", prompt_tokens=1, completion_tokens=9, resumed_from=3)
    assert _resumption(run, cont, moved) == {"resumed_from_token": 3, "workers": ["w1", "w2"]}  # type: ignore[arg-type]
    # One whose executor could not continue it (the static path): it says so
    static = _resumption(run, cont, out)  # type: ignore[arg-type]
    assert static["resumed_from_token"] == 0 and "static path" in static["restarted"]
    # One the record failed: the plan's reason
    gone = Continuation(resume=[], workers=("w1",), restarted="no token record")
    assert _resumption(run, gone, out)["restarted"] == "no token record"  # type: ignore[arg-type]


def test_a_task_that_asks_not_to_be_continued_starts_over_yet_repeats_nothing_to_its_reader() -> None:
    streams = _streams()
    _run(streams, "w1", 1.0, [("abc", [1, 2, 3], 0, None)])
    cont = plan(streams.record(TASK, max_tokens=10), seeded_sampling=False, resume=False)
    assert cont.resume == [] and "resume=False" in (cont.restarted or "")
    assert (cont.held_text, cont.held_tokens, cont.workers) == ("abc", 3, ("w1",))


def _signed_streams(identity: nacl.signing.SigningKey) -> TokenStreams:
    return TokenStreams(fakeredis.FakeRedis(), KeySchema("hypha"), identity=identity,
                        peer=peer_id(identity.verify_key))


def _registry(**peers: nacl.signing.SigningKey) -> Callable[[str, str], bool]:
    """trusted(worker, peer) of a registry where each named worker registered its key's identity."""
    return lambda worker, peer: worker in peers and peer_id(peers[worker].verify_key) == peer


def test_a_signed_record_from_a_registered_worker_is_continued_from_with_its_state() -> None:
    # Given w1 (registered with its identity) streamed tokens and a generator state, all signed
    key = nacl.signing.SigningKey.generate()
    streams = _signed_streams(key)
    _run(streams, "w1", 1.0, [("ab", [1, 2], 0, "cpu:S2"), ("abc", [3], 2, "cpu:S3")])
    # When a worker that signs its own results reads it
    record = streams.record(TASK, max_tokens=10, trusted=_registry(w1=key))
    # Then every entry checks out: the record is whole, state included
    assert record is not None and not record.refused
    assert record.ids == [1, 2, 3] and (record.rng, record.rng_tokens) == ("cpu:S3", 3)


def _tamper(streams: TokenStreams, how: str) -> None:
    key = streams.schema.token_stream(TASK)
    entries = streams.client.xrange(key)
    last_id, last = entries[-1]
    fields = {k.decode(): v.decode() for k, v in last.items()}
    if how == "text changed":
        fields["text"] = "evil"
    elif how == "signature dropped":
        fields.pop("sig")
    elif how == "another key":
        other = nacl.signing.SigningKey.generate()
        fields["sig"] = TokenStreams(fakeredis.FakeRedis(), identity=other).writer(TASK, 60)._signed(
            {k: v for k, v in fields.items() if k != "sig"})["sig"]
    streams.client.xdel(key, last_id)
    streams.client.xadd(key, fields)


@pytest.mark.parametrize("how", ["text changed", "signature dropped", "another key"])
def test_an_entry_that_is_not_its_workers_signed_one_is_refused(how: str) -> None:
    # Given a signed record whose last entry someone with write access to the result backend changed
    key = nacl.signing.SigningKey.generate()
    streams = _signed_streams(key)
    _run(streams, "w1", 1.0, [("ab", [1, 2], 0, None), ("abc", [3], 2, None)])
    _tamper(streams, how)
    # When a signing worker reads it
    record = streams.record(TASK, max_tokens=10, trusted=_registry(w1=key))
    # Then the record is refused from that entry on (the copy starts over), saying why
    assert record is not None and "not signed by its worker's registered identity" in record.refused
    assert plan(record, seeded_sampling=False).resume == []


def test_a_run_signed_by_an_unregistered_identity_is_refused_and_a_forged_state_is_ignored() -> None:
    # Given a record signed throughout, but by a key that is not the one w1 registered
    streams = _signed_streams(nacl.signing.SigningKey.generate())
    _run(streams, "w1", 1.0, [("ab", [1, 2], 0, "cpu:S2")])
    record = streams.record(TASK, max_tokens=10, trusted=_registry(w1=nacl.signing.SigningKey.generate()))
    assert record is not None and record.refused and record.ids == [] and record.rng_tokens == -1
    # And a registered record whose generator state was replaced (unsigned) keeps its tokens, not the state
    key = nacl.signing.SigningKey.generate()
    good = _signed_streams(key)
    _run(good, "w1", 1.0, [("ab", [1, 2], 0, "cpu:S2")])
    good.client.set(good.schema.token_rng(TASK), "2::cpu:FORGED")
    checked = good.record(TASK, max_tokens=10, trusted=_registry(w1=key))
    assert checked is not None and checked.ids == [1, 2] and checked.rng_tokens == -1


def test_a_registry_that_cannot_answer_trusts_nothing() -> None:
    key = nacl.signing.SigningKey.generate()
    streams = _signed_streams(key)
    _run(streams, "w1", 1.0, [("ab", [1, 2], 0, None)])

    def unreachable(worker: str, peer: str) -> bool:
        raise RegistryUnavailable("registry Redis unreachable")

    record = streams.record(TASK, max_tokens=10, trusted=unreachable)
    assert record is not None and record.refused and record.ids == []
