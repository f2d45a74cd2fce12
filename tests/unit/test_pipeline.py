"""The task pipeline's bookkeeping, with a hand-built node context: what counts as a refusal of the task."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from hypha_celery.errors import InvalidSignature, InvalidTask, RegistryUnavailable
from hypha_celery.monitoring.metrics import Metrics
from hypha_celery.monitoring.tracing import Tracing
from hypha_celery.tasks.base import HyphaTask, NotInWorker
from hypha_celery.tasks.pipeline import run_task


class Recorded(Metrics):
    def __init__(self) -> None:
        self.refusals: list[str] = []

    def refused(self, stage: Any) -> None:
        self.refusals.append(stage)


class Verifier:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def verify(self, *_: Any, **__: Any) -> Any:
        raise self.error


def context(verify_error: Exception | None = None) -> SimpleNamespace:
    security = SimpleNamespace(verify_task_signatures=verify_error is not None)
    return SimpleNamespace(
        config=SimpleNamespace(security=security),
        verifier=Verifier(verify_error or AssertionError("not called")),
        metrics=Recorded(),
        tracing=Tracing(),
    )


def _never(*_: Any) -> Any:
    raise AssertionError("the pipeline went past a refusal")


@pytest.mark.parametrize(
    ("verify_error", "counted"),
    [(InvalidSignature("forged"), ["signature"]), (RegistryUnavailable("nonce store down"), [])],
)
def test_only_a_refused_signature_counts_as_a_signature_rejection(
    task: HyphaTask, verify_error: Exception, counted: list[str]
) -> None:
    # Given a worker that checks signatures
    ctx = context(verify_error)
    task.node = ctx  # type: ignore[assignment]
    # When verification raises
    with pytest.raises(type(verify_error)):
        run_task(task, {}, validate=_never, body=_never)
    # Then a forged envelope is counted, a Redis outage during the check is not
    assert ctx.metrics.refusals == counted


@pytest.mark.parametrize(
    ("error", "counted"), [(InvalidTask("bad kwargs"), ["validation"]), (RegistryUnavailable("store down"), [])]
)
def test_only_an_invalid_task_counts_as_a_validation_rejection(task: HyphaTask, error: Exception, counted: list[str]) -> None:
    # Given a worker without signature checks
    ctx = context()
    task.node = ctx  # type: ignore[assignment]

    def validate(_: Any) -> Any:
        raise error

    # When validation raises
    with pytest.raises(type(error)):
        run_task(task, {}, validate=validate, body=_never)
    # Then only a refusal of the task itself is counted
    assert ctx.metrics.refusals == counted


def test_a_task_outside_a_worker_says_so(task: HyphaTask) -> None:
    # Given a hypha task no worker handed a node context
    # When it runs (e.g. called eagerly in a scheduler), Then the error says where it must run
    with pytest.raises(NotInWorker, match="celery -A hypha_celery worker"):
        run_task(task, {}, validate=_never, body=_never)
