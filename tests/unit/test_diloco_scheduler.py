"""The scheduler's outer step: re-sent with the same inputs when its worker is lost, never when its inputs are refused."""

from __future__ import annotations

from typing import Any

import pytest

from hypha_celery.errors import DeltaRejected, ExecutorCrashed
from hypha_celery.training.scheduler import DilocoJob, _Settings

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
    out = _job(app)._aggregate(1, "m", None, [REPORT])
    # Then it was sent twice, with identical arguments, and the second answer is the round's
    assert out == {"model_id": "j-v1"}
    assert [name for name, _ in app.sent] == ["hypha.aggregate"] * 2 and app.sent[0][1] == app.sent[1][1]


def test_an_outer_step_refused_for_its_inputs_fails_the_job_at_once() -> None:
    app = _App(DeltaRejected("tampered"), {"output": {}})
    with pytest.raises(DeltaRejected):
        _job(app)._aggregate(1, "m", None, [REPORT])
    assert len(app.sent) == 1


def test_the_outer_step_gives_up_after_three_failures() -> None:
    app = _App(*(ExecutorCrashed("gone") for _ in range(3)))
    with pytest.raises(ExecutorCrashed):
        _job(app)._aggregate(1, "m", None, [REPORT])
    assert len(app.sent) == 3
