"""What a copy of a generation continues from (hypha_celery.stages.continuation), read from its token stream
(token_stream.read_record) on fakeredis: every entry checked, since other workers wrote them."""

from __future__ import annotations

import time
from types import SimpleNamespace

import fakeredis
import pytest

from hypha_celery.keys import KeySchema
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
