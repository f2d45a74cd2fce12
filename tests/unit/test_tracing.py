"""One trace per request, in-process: the pipeline's stage spans read back from OpenTelemetry's in-memory exporter.

The node context is hand-built (as in ``test_pipeline``) and admission is stubbed, so the
stages run without Redis; the spans are the real ones the worker would export.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import signals
from celery.exceptions import Ignore

from hypha_celery.errors import ExecutorCrashed, InvalidTask
from hypha_celery.gateway.app import Gateway, create_app
from hypha_celery.monitoring.metrics import Metrics
from hypha_celery.monitoring.tracing import Span, Tracing, from_env, wanted
from hypha_celery.resources.ledger import Lease
from hypha_celery.tasks import pipeline
from hypha_celery.tasks.base import HyphaTask
from hypha_celery.tasks.pipeline import Run, model_under_lease, package_inferred, run_task
from tests.conftest import ROOT
from tests.unit.test_gateway import FakeNetwork

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the [otel] extra is not installed")
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import StatusCode, format_span_id, format_trace_id  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

STAGES = ["hypha.verify", "hypha.validate", "hypha.admit", "hypha.run", "hypha.sign"]


@pytest.fixture
def exported() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    yield tracing, exporter
    tracing.close()


class Verifier:
    def verify(self, *_: Any, **__: Any) -> Any:
        return SimpleNamespace(first_delivery=True, model_sha256=None, request_sha256="ab" * 32, finished=False,
                               key_id="k", nonce="n")


class Signer:
    """Stands in for the worker's identity: ``attest`` is stubbed below."""


def context(tracing: Tracing) -> SimpleNamespace:
    return SimpleNamespace(
        config=SimpleNamespace(security=SimpleNamespace(verify_task_signatures=True), task_timeout=60.0),
        verifier=Verifier(),
        metrics=Metrics(),
        tracing=tracing,
        node_id="node",
        ledger=None,
        placement=None,
        keeper=SimpleNamespace(add=lambda lease: None, lost=lambda lease: False),
        inference_times=SimpleNamespace(observe=lambda *_: None, flush=lambda *_: None),
        redis=None,
        identity=Signer(),
    )


@pytest.fixture
def admitted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission grants a CPU lease; STARTED, release and the attestation are no-ops (they need Redis and a key)."""
    lease = Lease(id="l1", node="node", memory=1, cores={0: 1000}, gpus={}, exclusive_gpu=False, task_id="t1")
    monkeypatch.setattr(pipeline.admission, "admit", lambda *_, **__: lease)
    monkeypatch.setattr(pipeline, "started_with", lambda *_: None)
    monkeypatch.setattr(pipeline, "release_with_result", lambda *_: None)
    monkeypatch.setattr(pipeline, "attest", lambda _key, result, **__: {**result, "signed": True})


SPEC = SimpleNamespace(model="mlp", manifest=SimpleNamespace(adapter_of=None), requirements=None, finished=None)
ITEM = SimpleNamespace(output={"y": [1]}, cache_hit=True, batch_size=2, load_s=0.0, memory_peak=0, device="cpu",
                       compute_s=0.001, cpu_affinity=[0], gpu_memory_peak=None)


def _infer_like(run: Run, spec: Any, fail: Exception | None = None) -> dict[str, Any]:
    """What ``hypha.infer``'s body does: load, one executor round trip, package."""
    model_under_lease(run, spec, lambda _: None)
    with run.executor_span() as call:
        if fail is not None:
            raise fail
        call.set("hypha.batch_size", ITEM.batch_size)
    return package_inferred(run, spec.model, ITEM)


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def _parent(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def test_each_stage_is_a_span_under_the_tasks_span(
    task: HyphaTask, exported: tuple[Tracing, InMemorySpanExporter], admitted: None
) -> None:
    tracing, exporter = exported
    task.node = context(tracing)  # type: ignore[assignment]
    # When a task runs through every stage
    result = run_task(task, {"model": "mlp"}, validate=lambda _: SPEC, body=_infer_like)
    # Then it succeeded and each stage is one span
    assert result["signed"] is True
    spans = _by_name(exporter.get_finished_spans())
    assert sorted(spans) == sorted(["hypha.task", *STAGES, "hypha.load", "hypha.executor", "hypha.package"])
    assert len(exporter.get_finished_spans()) == len(spans)
    root = spans["hypha.task"]
    # ... in one trace: the stages under the task's span, the body's parts under hypha.run
    assert {span.context.trace_id for span in spans.values()} == {root.context.trace_id}
    assert _parent(root) is None
    for name in STAGES:
        assert _parent(spans[name]) == root.context.span_id, name
    for name in ("hypha.load", "hypha.executor", "hypha.package"):
        assert _parent(spans[name]) == spans["hypha.run"].context.span_id, name
    # ... in the order they ran
    order = sorted(STAGES, key=lambda name: spans[name].start_time or 0)
    assert order == STAGES
    # ... naming the task, its model, its device and its outcome
    assert root.attributes is not None
    assert dict(root.attributes) == {"hypha.task": "hypha.test", "hypha.task_id": "t1", "hypha.model": "mlp",
                                     "hypha.status": "ok"}
    assert spans["hypha.load"].attributes == {"hypha.model": "mlp", "hypha.fetched": False, "hypha.status": "ok"}
    assert spans["hypha.executor"].attributes == {"hypha.device": "cpu", "hypha.batch_size": 2, "hypha.status": "ok"}
    assert spans["hypha.admit"].attributes == {"hypha.device": "cpu", "hypha.status": "ok"}
    assert all(span.status.status_code is StatusCode.UNSET for span in spans.values())


def test_a_failed_executor_call_marks_its_span_and_those_above_it(
    task: HyphaTask, exported: tuple[Tracing, InMemorySpanExporter], admitted: None
) -> None:
    tracing, exporter = exported
    task.node = context(tracing)  # type: ignore[assignment]
    # When the executor round trip fails
    with pytest.raises(ExecutorCrashed):
        run_task(task, {"model": "mlp"}, validate=lambda _: SPEC,
                 body=lambda run, spec: _infer_like(run, spec, ExecutorCrashed("the executor died")))
    spans = _by_name(exporter.get_finished_spans())
    # Then the executor span, the run and the task are errors that carry the exception; earlier stages are not
    for name in ("hypha.executor", "hypha.run", "hypha.task"):
        span = spans[name]
        assert span.status.status_code is StatusCode.ERROR, name
        assert span.status.description == "ExecutorCrashed: the executor died"
        assert span.attributes is not None and span.attributes["hypha.status"] == "error"
        assert [event.name for event in span.events] == ["exception"]
    for name in ("hypha.verify", "hypha.validate", "hypha.admit", "hypha.load"):
        assert spans[name].status.status_code is StatusCode.UNSET, name
    # ... and nothing after it ran
    assert "hypha.package" not in spans and "hypha.sign" not in spans


def test_a_refused_task_ends_its_trace_at_validation(
    task: HyphaTask, exported: tuple[Tracing, InMemorySpanExporter], admitted: None
) -> None:
    tracing, exporter = exported
    task.node = context(tracing)  # type: ignore[assignment]

    def refuse(_: Any) -> Any:
        raise InvalidTask("inputs must be a list")

    with pytest.raises(InvalidTask):
        run_task(task, {"model": "mlp"}, validate=refuse, body=_infer_like)
    spans = _by_name(exporter.get_finished_spans())
    assert sorted(spans) == ["hypha.task", "hypha.validate", "hypha.verify"]
    assert spans["hypha.validate"].status.status_code is StatusCode.ERROR
    assert spans["hypha.task"].attributes is not None and "hypha.model" not in spans["hypha.task"].attributes


def test_a_deferral_is_an_outcome_not_an_error(exported: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = exported
    # When a stage raises Celery's Ignore (a deferred task, a dropped copy)
    with pytest.raises(Ignore), tracing.span("hypha.admit"):
        raise Ignore()
    # Then its span says so without being marked failed
    [span] = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes == {"hypha.status": "ignored"}


def test_off_tracing_hands_out_one_do_nothing_span() -> None:
    tracing = Tracing()
    span = tracing.span("hypha.task", {"hypha.task_id": "t1"})
    # Off: no span object per stage, nothing recorded, nothing to close
    assert not tracing.enabled
    assert type(span) is Span and span is tracing.span("hypha.run") is tracing.server_span("GET /", {})
    with span as opened:
        opened.set("hypha.model", "mlp")
    tracing.close()


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"HYPHA_TRACES_FILE": "/tmp/spans.jsonl"}, True),
    ],
)
def test_tracing_is_on_only_when_the_environment_asks(environ: dict[str, str], on: bool) -> None:
    assert wanted(environ) is on


def test_an_unconfigured_process_gets_off_tracing() -> None:
    assert not from_env("hypha-test", {}).enabled


def test_importing_the_worker_and_its_tasks_imports_no_opentelemetry() -> None:
    # Off is free: nothing of OpenTelemetry is loaded for us until the environment asks for traces (redis-py loads
    # some of its own when it is installed: that is counted before)
    code = ("import sys, redis, celery, starlette.applications\nbefore = set(sys.modules)\n"
            "import hypha_celery.monitoring.tracing, hypha_celery.worker.bootsteps, hypha_celery.tasks.infer, "
            "hypha_celery.gateway.app\n"
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


class PublishingNetwork(FakeNetwork):
    """The gateway's fake network, whose submit publishes as Celery does: its signals around a message's headers."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[dict[str, Any]] = []

    def submit(self, task: str, kwargs: dict[str, Any]) -> Any:
        headers: dict[str, Any] = {"id": f"task-{len(self.headers)}", "task": task}
        signals.before_task_publish.send(sender=task, headers=headers, body=((), kwargs, {}))
        signals.after_task_publish.send(sender=task, headers=headers, body=((), kwargs, {}))
        self.headers.append(headers)
        return super().submit(task, kwargs)


def test_a_gateway_request_continues_its_clients_trace_into_the_message(
    exported: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = exported
    network = PublishingNetwork()
    undo = tracing.trace_publishes()
    try:
        app = create_app(Gateway(network=network, keys=None, limiter=None, tracing=tracing))  # type: ignore[arg-type]
        client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        with TestClient(app) as http:
            # When a client that traces asks for a chat completion
            answer = http.post("/v1/chat/completions", headers={"traceparent": f"00-{client_trace}-{client_span}-01"},
                               json={"model": "gen", "messages": [{"role": "user", "content": "abc"}]})
    finally:
        undo()
    assert answer.status_code == 200
    spans = _by_name(exporter.get_finished_spans())
    server, publish = spans["POST /v1/chat/completions"], spans["apply_async/hypha.generate"]
    # Then the gateway's span continues the client's trace, the publish is its child
    assert format_trace_id(server.context.trace_id) == client_trace
    assert server.parent is not None and format_span_id(server.parent.span_id) == client_span
    assert publish.parent is not None and publish.parent.span_id == server.context.span_id
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 200
    assert publish.attributes is not None and publish.attributes["messaging.message.id"] == "task-0"
    # ... and the message carries the publish span's context to the worker
    [headers] = network.headers
    assert headers["traceparent"] == f"00-{client_trace}-{format_span_id(publish.context.span_id)}-01"
