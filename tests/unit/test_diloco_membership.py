"""DiLoCo's elastic membership: each round's inner tasks from the live workers then, shards round-robin across rounds."""

from __future__ import annotations

from collections import Counter
from typing import Any

import fakeredis

from hypha_celery.resources.requirements import Requirements
from hypha_celery.training.distributed.membership import Member, assign, fits, registry_members
from hypha_celery.training.distributed.rounds import describe_round, inner_rows, round_entry
from hypha_celery.training.distributed.scheduler import DilocoJob, _Settings

A, B, C = (Member(worker=name, queue=f"hypha.worker.{name}") for name in ("a", "b", "c"))


def test_more_shards_than_workers_are_trained_in_turn_each_as_often() -> None:
    # Given five shards and two workers, over five rounds (the cursor moving past each round's tasks)
    cursor, trained = 0, Counter[int]()
    for turn in range(5):
        sent = assign(5, [B, A], cursor=cursor, at_least=1, shared_queue="hypha", turn=turn)
        # Then each round sends one task per worker, on its own queue, to distinct shards
        assert [a.worker for a in sent] == ["a", "b"] and len({a.shard for a in sent}) == 2
        assert [a.queue for a in sent] == [A.queue, B.queue]
        trained.update(a.shard for a in sent)
        cursor = (cursor + len(sent)) % 5
    # And every shard was trained twice
    assert trained == {shard: 2 for shard in range(5)}


def test_a_quorum_above_the_workers_sends_the_rest_to_the_shared_queue() -> None:
    sent = assign(4, [A], cursor=0, at_least=3, shared_queue="hypha")
    assert [(a.shard, a.queue, a.worker) for a in sent] == [(0, A.queue, "a"), (1, "hypha", None), (2, "hypha", None)]


def test_without_members_every_shard_goes_to_the_shared_queue() -> None:
    sent = assign(3, [], cursor=1, at_least=1, shared_queue="q")
    assert [(a.shard, a.queue) for a in sent] == [(1, "q"), (2, "q"), (0, "q")]


def test_more_workers_than_shards_take_turns_so_a_late_joiner_trains() -> None:
    # Given two shards and three workers, C the last by id
    turns = [{a.worker for a in assign(2, [A, B, C], cursor=0, at_least=1, shared_queue="h", turn=t)}
             for t in range(3)]
    # Then every worker is sent a task within three rounds, two per round
    assert all(len(workers) == 2 for workers in turns) and set().union(*turns) == {"a", "b", "c"}


def _record(worker: str, **fields: Any) -> dict[str, Any]:
    return {"worker_id": worker, "queue": f"hypha.worker.{worker}", "shared_storage": 1,
            "max_cpu_cores_per_task": 4, "max_memory_per_task": 8 * 2**30, "gpus": [], **fields}


def test_a_member_has_shared_storage_and_caps_that_fit_the_inner_task() -> None:
    req = Requirements.parse({"cpu_cores": 2, "memory": "1GiB"})
    assert fits(_record("a"), req)
    assert not fits(_record("a", shared_storage=0), req)
    assert not fits({k: v for k, v in _record("a").items() if k != "shared_storage"}, req)  # an older worker
    assert not fits(_record("a", max_cpu_cores_per_task=1), req)
    assert not fits(_record("a", max_memory_per_task=2**29), req)
    assert not fits(_record("a"), Requirements.parse({"gpus": 1}))


def test_registry_members_reads_live_records_each_call() -> None:
    # Given a registry with one DiLoCo worker and one without shared storage
    from hypha_celery.keys import KeySchema

    client = fakeredis.FakeRedis()
    schema = KeySchema.from_env()

    def put(worker: str, **fields: Any) -> None:
        import json
        import time

        encoded = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in _record(worker, **fields).items()}
        client.hset(schema.worker(worker), mapping=encoded)
        client.zadd(schema.workers(), {worker: time.time() + 60})

    put("a")
    put("z", shared_storage=0)
    read = registry_members({"cpu_cores": 1}, client=client)
    # When a second DiLoCo worker registers between two calls
    first = read()
    put("b")
    second = read()
    # Then the first call saw one member and the second two
    assert [m.worker for m in first] == ["a"] and [m.worker for m in second] == ["a", "b"]


def test_a_job_assigns_each_round_from_the_workers_live_then() -> None:
    # Given a job of three shards that sees one worker in rounds 1-3, and a second from round 4 on
    live = {"now": [A]}
    settings = _Settings(model="m", shards=[{"texts": ["x"]}] * 3, rounds=5, inner_steps=1, outer_lr=1.0,
                         outer_momentum=0.0, min_workers=None, requirements=None, aggregate_requirements={},
                         signing_key=None, round_timeout=5, straggler_s=5, queue=None, members=lambda: live["now"])
    job = DilocoJob(None, "j", settings)  # type: ignore[arg-type]
    rounds = []
    for round_ in range(1, 6):
        if round_ == 4:
            live["now"] = [A, B]
        rounds.append(job._assign(round_))
    # Then rounds 1-3 send one task, round 4 one to each, the new worker's on its own queue
    assert [len(sent) for sent in rounds] == [1, 1, 1, 2, 2]
    assert {a.worker for a in rounds[3]} == {"a", "b"} and B.queue in {a.queue for a in rounds[3]}
    # And the shards went round-robin: 0, 1, 2, then 0 and 1, then 2 and 0
    assert [[a.shard for a in sent] for sent in rounds] == [[0], [1], [2], [0, 1], [2, 0]]
    # And the round needs every task it sent (min_workers unset)
    assert job._need(rounds[3]) == 2


def test_a_round_entry_shows_bytes_steps_seconds_refusals_and_failures() -> None:
    # Given the reports of two inner tasks and the outer step's answer with one refusal
    reports = [{"ref": "jobs/j/round-2/t1.safetensors", "worker": "w1", "steps": 5, "seconds": 3.5, "bytes": 400,
                "base_bytes": 400, "parameters": 100, "loss": 2.0},
               {"ref": "jobs/j/round-2/t2.safetensors", "worker": "w2", "steps": 7, "seconds": "bogus",
                "bytes": 100, "base_bytes": 400, "parameters": 100, "loss": 1.0}]
    outcome = {"loss": 2.5, "workers": ["w1", "w2"], "bytes_moved": 1300, "refused": [{"reason": "too big"}],
               "model_id": "j-v2"}
    # When the round's entry is made
    entry = round_entry(2, outcome, inner_rows(reports, {"t1": 0, "t2": 3}), assigned=3,
                        failed={"t3": "late: revoked"}, duration_s=12.3456)
    # Then it holds each worker's steps and seconds (a figure that is not a number shown as unknown), its shard,
    # the bytes and their ratio to float32 deltas, the refusals and the failures
    assert [(r["worker"], r["shard"], r["steps"], r["seconds"]) for r in entry["inner"]] == [
        ("w1", 0, 5, 3.5), ("w2", 3, 7, None)]
    assert entry["delta_bytes"] == 500 and entry["compression"] == 0.625 and entry["assigned"] == 3
    assert entry["duration_s"] == 12.346 and entry["failed"] == {"t3": "late: revoked"}
    lines = describe_round(entry)
    assert lines[0].startswith("round 2: loss 2.5000  workers 2/3") and "0.62x float32" in lines[0]
    assert "w1: shard 0, 5 steps in 3.5 s" in lines[1] and "w2: shard 3, 7 steps in ? s" in lines[2]
    assert lines[3] == "  refused too big" and lines[4] == "  no delta from t3: late: revoked"
