"""The pure parts of continuous batching's wiring: messages, reply routing by id, which path, the lane's answers.

No executor process: the lane is fed replies as the executor's reader thread would feed it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from hypha_celery import errors
from hypha_celery.executor.batching import BatchPolicy, continuous
from hypha_celery.executor.continuous import combined_limits
from hypha_celery.executor.pool import ExecutorPool, _Lane
from hypha_celery.executor.process import ExecutorSettings
from hypha_celery.executor.requests import Request
from hypha_celery.executor.tags import Tags
from hypha_celery.protocol import (
    Cancel,
    Error,
    GenerateResult,
    ProtocolError,
    Submit,
    Tagged,
    Usage,
    decode_reply,
    decode_request,
)
from hypha_celery.resources.ledger import Lease
from hypha_celery.work import Generate, Generated, JobLimits, Prompt, Streamed

USAGE = Usage(memory_peak=0, device="cpu", cpu_affinity=[0])


def _result(text: str = "hi", batch: int = 3) -> GenerateResult:
    return GenerateResult(outputs=[Generated(text, "length", 2, 4)], errors=[None], time_to_first_token_s=0.1,
                          compute_s=0.5, cache_hit=True, load_s=0.0, cache={"m": 10}, usage=USAGE, batch_size=batch)


def test_submit_cancel_and_tagged_replies_travel_as_one_json_line_each() -> None:
    job = Generate(model="m", params={"max_new_tokens": 4}, prompts=[Prompt("hello")], limits=JobLimits(memory=5))
    assert decode_request(Submit(7, job).encode()) == Submit(7, job)
    assert decode_request(Cancel(7).encode()) == Cancel(7)
    for reply in (Streamed(text="a", tokens=1, ids=[3]), _result(), Error("InvalidInput", "no")):
        assert decode_reply(Tagged(7, reply).encode()) == Tagged(7, reply)
    with pytest.raises(ProtocolError):
        decode_reply(b'{"kind":"tagged","id":1,"reply":{"kind":"ready","pid":1}}')


def test_tags_route_reports_then_the_final_reply_and_drop_replies_nobody_waits_for() -> None:
    got: list[Any] = []
    tags: Tags[Any, errors.HyphaError] = Tags(lambda reply: not isinstance(reply, Streamed))
    tags.add(1, got.append)
    streamed = Streamed(text="a", tokens=1)
    assert tags.route(1, streamed) and len(tags) == 1  # a report keeps it registered
    assert tags.route(1, _result()) and len(tags) == 0  # the result ends it
    assert not tags.route(1, _result())  # a late reply (it was cancelled) goes nowhere
    assert got == [streamed, _result()]


def test_a_lost_executor_tells_every_generation_once_and_refuses_new_ones() -> None:
    got: dict[int, list[Any]] = {1: [], 2: []}
    tags: Tags[Any, errors.HyphaError] = Tags(lambda reply: True)

    def broken(reply: Any) -> None:
        raise RuntimeError("a handler's bug")

    tags.add(0, broken)  # a failing handler does not keep the others from hearing
    for id in got:
        tags.add(id, got[id].append)
    error = errors.ExecutorCrashed("gone")
    assert tags.lose(error) == 3 and tags.lost_with == 3
    assert got == {1: [error], 2: [error]}
    with pytest.raises(errors.ExecutorCrashed):
        tags.add(3, print)


def test_which_generations_join_the_running_batch() -> None:
    assert continuous({"max_new_tokens": 4, "do_sample": True, "seed": 1}, None)  # seeded rows have their own generator
    assert not continuous({"proof": True}, None)  # captured from transformers' generate: static
    assert not continuous({}, "base-model")  # a LoRA adapter: static batches of its base's family


def test_rows_decoding_together_run_under_the_sum_of_their_limits() -> None:
    rows = [JobLimits(memory=100, cores=[0, 1], threads=1), JobLimits(memory=50, cores=[1], threads=1),
            JobLimits()]
    assert combined_limits(rows) == JobLimits(memory=150, cores=[0, 1], gpu_memory=None, threads=1)
    assert combined_limits([*rows, JobLimits(cores=[0, 1, 2], threads=3)]).threads == 3
    assert combined_limits([]) == JobLimits()


class _Executor:
    name = "serve-cpu"
    lost_with = 0
    alive = True

    def __init__(self) -> None:
        self.cancelled: list[int] = []

    def cancel(self, id: int) -> None:
        self.cancelled.append(id)


@pytest.fixture
def lane() -> _Lane:
    settings = ExecutorSettings(store="/nonexistent", cache_size=0, max_model_size=0, sandbox=False, nice=0,
                                enforce_memory=False, enforce_cpu=False)
    pool = ExecutorPool(settings)
    lane = _Lane(pool, "cpu")
    pool.closed = True  # the lane's thread leaves: the tests feed the lane themselves
    with lane.cond:
        lane.cond.notify_all()
    lane.thread.join(5)
    assert not lane.thread.is_alive()
    pool.closed = False
    pool.policy = BatchPolicy.uniform(1, 0.0)
    return lane


def _inflight(lane: _Lane, tag: int, deadline_s: float = 60.0) -> tuple[Request, _Executor]:
    lease = Lease(id="l", node="n", memory=1, cores={}, gpus={}, exclusive_gpu=False)
    job = Generate(model="m", params={}, prompts=[Prompt("x")])
    request = Request("m", None, lease, time.monotonic() + deadline_s, None, None, generate=job, submitted=True,
                       tag=tag)
    executor = _Executor()
    with lane.cond:
        lane.inflight[tag] = (request, executor)  # type: ignore[assignment]
    return request, executor


def test_the_lane_streams_then_answers_a_submitted_generation_by_its_tag(lane: _Lane) -> None:
    request, _ = _inflight(lane, 5)
    other, _ = _inflight(lane, 6)
    lane._tagged(5, Streamed(text="h", tokens=1))
    lane._tagged(5, _result("hi", batch=2))
    assert request.updates.get_nowait() == Streamed(text="h", tokens=1)
    assert request.generated is not None and request.generated.output.text == "hi"
    assert request.generated.batch_size == 2 and lane.cache == {"m": 10}
    assert not other.done.is_set() and 6 in lane.inflight  # its neighbour is untouched


def test_a_refused_row_fails_alone_by_name(lane: _Lane) -> None:
    request, _ = _inflight(lane, 1)
    neighbour, _ = _inflight(lane, 2)
    refused = GenerateResult(outputs=[None], errors=[Error("InvalidInput", "too long")], time_to_first_token_s=0,
                             compute_s=0, cache_hit=True, load_s=0, cache={}, usage=USAGE)
    lane._tagged(1, refused)
    assert isinstance(request.error, errors.InvalidInput) and not neighbour.done.is_set()


def test_a_generation_past_its_deadline_is_cancelled_in_the_executor_and_times_out(lane: _Lane) -> None:
    request, executor = _inflight(lane, 3, deadline_s=-1.0)
    with lane.cond:
        lane._check_deadlines()
    assert executor.cancelled == [3] and isinstance(request.error, errors.TaskTimeout)
    lane._tagged(3, Error("ExecutionError", "the generation was cancelled"))  # the executor's late answer
    assert isinstance(request.error, errors.TaskTimeout) and 3 not in lane.overdue


def test_a_revoked_task_cancels_its_row(lane: _Lane) -> None:
    request, executor = _inflight(lane, 4)
    lane.cancel(request)
    assert executor.cancelled == [4] and request.cancelled and request.done.is_set()


def test_a_lost_executor_fails_a_lone_generation_and_retries_one_of_several_alone(lane: _Lane) -> None:
    lone, executor = _inflight(lane, 8)
    executor.lost_with = 1
    lane._tagged(8, errors.ExecutorCrashed("gone"))
    assert isinstance(lone.error, errors.ExecutorCrashed)
    shared, executor = _inflight(lane, 9)
    executor.lost_with = 3
    lane._tagged(9, errors.ExecutorCrashed("gone"))
    assert shared.retried and not shared.done.is_set() and len(lane.pending) == 1
