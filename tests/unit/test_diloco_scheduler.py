"""The scheduler's outer step: re-sent with the same inputs when its worker is lost, never when its inputs are refused."""

from __future__ import annotations

from typing import Any

import pytest

from hypha_celery.errors import DeltaRejected, ExecutorCrashed
from hypha_celery.training.distributed.scheduler import DilocoJob, _Settings, shard_sizes

REPORT = {"job": "j", "round": 1, "ref": "jobs/j/round-1/t.safetensors", "sha256": "a" * 64, "samples": 4}


class _Result:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    def get(self, timeout: float, propagate: bool) -> Any:
        if isinstance(outcome := self.outcome, BaseException):
            raise outcome
        return outcome


class _App:
    """Answers each send_task with the next outcome; remembers what was sent."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, kwargs: dict[str, Any], **options: Any) -> _Result:
        self.sent.append((name, kwargs))
        return _Result(self.outcomes.pop(0))


def _job(app: _App) -> DilocoJob:
    settings = _Settings(model="m", shards=[{"texts": ["a"]}], rounds=1, inner_steps=2, outer_lr=0.7,
                         outer_momentum=0.9, min_workers=1, requirements=None,
                         aggregate_requirements={"cpu_cores": 0.5}, signing_key=None, round_timeout=5,
                         straggler_s=5, queue="hypha")
    return DilocoJob(app, "j", settings)  # type: ignore[arg-type]


def test_an_outer_step_whose_worker_died_is_sent_again_with_the_same_inputs() -> None:
    # Given an outer step that fails once because its executor crashed, then answers
    app = _App(ExecutorCrashed("gone"), {"output": {"model_id": "j-v1"}})
    # When the round aggregates
    out = _job(app)._aggregate(1, "m", None, [REPORT], {"t": 1})
    # Then it was sent twice, with identical arguments, and the second answer is the round's
    assert out == {"model_id": "j-v1"}
    assert [name for name, _ in app.sent] == ["hypha.aggregate"] * 2 and app.sent[0][1] == app.sent[1][1]


def test_an_outer_step_refused_for_its_inputs_fails_the_job_at_once() -> None:
    app = _App(DeltaRejected("tampered"), {"output": {}})
    with pytest.raises(DeltaRejected):
        _job(app)._aggregate(1, "m", None, [REPORT], {"t": 1})
    assert len(app.sent) == 1


def test_the_outer_step_gives_up_after_three_failures() -> None:
    app = _App(*(ExecutorCrashed("gone") for _ in range(3)))
    with pytest.raises(ExecutorCrashed):
        _job(app)._aggregate(1, "m", None, [REPORT], {"t": 1})
    assert len(app.sent) == 3


def test_the_outer_step_is_signed_with_the_schedulers_weights_not_the_reported_samples() -> None:
    # Given a report that claims 10^15 samples for a shard the scheduler sent 4 texts
    app = _App({"output": {"model_id": "j-v1"}})
    # When the round aggregates
    _job(app)._aggregate(1, "m", None, [{**REPORT, "samples": 10**15}], {"t": 4})
    # Then the outer step's kwargs weigh the task by its shard (4), the report travels as it came, only as information
    kwargs = app.sent[0][1]
    assert kwargs["weights"] == {"t": 4} and kwargs["deltas"][0]["samples"] == 10**15


def test_shard_sizes_are_the_texts_sent_or_what_the_caller_gives() -> None:
    # Given inline shards, Then each weighs its number of texts
    assert shard_sizes([{"texts": ["a"] * 3}, {"texts": ["b"] * 5}]) == [3, 5]
    # And a stored data set's size is unknown here: every shard weighs 1 unless the caller says
    assert shard_sizes([{"texts": ["a"] * 3}, {"ref": "corpus"}]) == [1, 1]
    assert shard_sizes([{"texts": ["a"] * 3}, {"ref": "corpus"}], [3, 100]) == [3, 100]
    with pytest.raises(ValueError, match="shard_weights must be 2 positive integers"):
        shard_sizes([{"texts": ["a"]}, {"ref": "corpus"}], [1, 0])


class _DoneJob:
    """A finished job whose one round refused a delta."""

    entry = {"round": 1, "loss": 2.0, "workers": ["w0"], "bytes_moved": 10, "duration_s": 1.0,
             "refused": [{"ref": "jobs/j/round-1/x.safetensors", "reason": "delta x: tensor b holds NaN; refused"}]}

    def progress(self) -> dict[str, Any]:
        return {"stage": "done", "round": 1, "rounds": 1, "finished": 1, "history": [self.entry]}

    def wait(self, timeout: float) -> dict[str, Any]:
        return {"model_id": "j-v1", "rounds": [self.entry]}


def test_the_cli_prints_each_refused_delta_with_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    from hypha_celery.cli.train import _follow

    # When `run diloco` follows a job whose round refused a delta
    _follow(_DoneJob(), timeout=5)
    # Then the round's line is followed by the refusal and its reason
    err = capsys.readouterr().err
    assert "round 1: loss 2.0000" in err and "refused delta x: tensor b holds NaN; refused" in err


class _Inner:
    """A finished inner task as the scheduler's group sees it."""

    def __init__(self, task_id: str, report: Any, state: str = "SUCCESS") -> None:
        self.id, self.state, self.result = task_id, state, {"output": {"diloco": report}}


@pytest.mark.parametrize("change", [
    {"ref": "jobs/j/round-1/t1.safetensors"},  # another task's delta: it would take t1's weight, counted twice
    {"ref": "jobs/j/round-1/t2"},
    {"ref": ["jobs/j/round-1/t2.safetensors"]},
    {"sha256": 7},
])
def test_a_report_that_is_not_its_own_tasks_delta_is_a_failure_not_a_report(change: dict[str, Any]) -> None:
    from hypha_celery.training.distributed.scheduler import _collect

    # Given task t2 answering a report whose ref is not its own delta key, or whose sha256 is not a string
    reports: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    # When the scheduler collects it
    _collect(_Inner("t2", {**REPORT, **change}), 1, "j", reports, failures)  # type: ignore[arg-type]
    # Then it is recorded as t2's failure, and no report is kept
    assert reports == {} and "not its own" in failures["t2"]


def test_a_report_of_its_own_delta_is_kept() -> None:
    from hypha_celery.training.distributed.scheduler import _collect

    reports: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    own = {**REPORT, "ref": "jobs/j/round-1/t2.safetensors"}
    _collect(_Inner("t2", own), 1, "j", reports, failures)  # type: ignore[arg-type]
    assert reports == {"t2": own} and failures == {}


def test_a_lora_jobs_round_0_makes_its_adapter_and_each_round_names_the_adapter_pinned() -> None:
    # Given a LoRA job's settings (seed 3)
    app = _App({"output": {"model_id": "j-v0", "sha256": "b" * 64}})
    job = _job(app)
    job.settings.lora, job.settings.train_kwargs = {"r": 4}, {"seed": 3}
    # When round 0 is sent as the job starts it
    first = job._send_aggregate(0, {"job": "j", "round": 0, "base": "m", "lora": {"r": 4}, "seed": 3})
    # Then it is an outer step without deltas, and its adapter is what round 1's inner tasks continue, pinned
    assert first["model_id"] == "j-v0" and "deltas" not in app.sent[0][1]
    assert job.settings.block("j", 1, "j-v0", "b" * 64) == {"job": "j", "round": 1, "inner_steps": 2,
                                                            "adapter": "j-v0", "adapter_sha256": "b" * 64}
