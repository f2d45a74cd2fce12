"""One trace per request, through a real worker and Redis: the scheduler's publish and the worker's stages share it.

The scheduler side is this process (spans in OpenTelemetry's in-memory exporter); the worker
writes its spans to a file (``HYPHA_TRACES_FILE``), read back here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from hypha_celery.client import submit
from hypha_celery.monitoring.tracing import TRACES_FILE, Tracing
from hypha_celery.security import peer_id

pytest.importorskip("opentelemetry.sdk.trace", reason="the [otel] extra is not installed")
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

IRIS = [[5.1, 3.5, 1.4, 0.2]]
WORKER_SPANS = {"run/hypha.infer", "hypha.task", "hypha.verify", "hypha.validate", "hypha.admit", "hypha.run",
                "hypha.load", "hypha.executor", "hypha.package", "hypha.sign"}


def _read_spans(path: Path, trace_id: str, names: set[str], wait_s: float = 60.0) -> dict[str, dict[str, Any]]:
    """The worker's spans of ``trace_id`` by name, once all of ``names`` are in the file (Celery's ``run`` span
    ends after the result is stored, so it may land a moment after ``get`` returns)."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        spans = [json.loads(line) for line in lines]
        found = {span["name"]: span for span in spans if span["context"]["trace_id"] == trace_id}
        if names <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_the_publish_and_the_workers_stages_are_one_trace(
    start_worker: Callable[..., Any], celery_client: Callable[..., Any], tmp_path: Path
) -> None:
    # Given a worker that verifies signatures and writes its spans to a file
    key = nacl.signing.SigningKey.generate()
    spans_file = tmp_path / "worker-spans.jsonl"
    start_worker({"security": {"verify_task_signatures": True, "allowed_schedulers": [peer_id(key.verify_key)]}},
                 env={TRACES_FILE: str(spans_file), "OTEL_SERVICE_NAME": "hypha-worker-e2e"})
    app = celery_client()
    # ... and a scheduler that traces its publishes in memory
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    undo = tracing.trace_publishes()
    try:
        # When it submits one task inside a span of its own
        with tracing.span("scheduler.request"):
            result = submit("hypha.infer", model="mlp", inputs=IRIS, signing_key=key, app=app, queue="hypha")
        answer = result.get(timeout=120)
    finally:
        undo()
        tracing.close()
    assert answer["output"]
    # Then the scheduler recorded the publish under its own span
    mine = {span.name: span for span in exporter.get_finished_spans()}
    assert set(mine) == {"scheduler.request", "apply_async/hypha.infer"}
    publish = mine["apply_async/hypha.infer"]
    assert publish.parent is not None and publish.parent.span_id == mine["scheduler.request"].context.span_id
    assert publish.attributes is not None and publish.attributes["messaging.message.id"] == result.id
    trace_id = f"0x{format_trace_id(publish.context.trace_id)}"
    # ... and every span the worker wrote for the task is in that same trace
    theirs = _read_spans(spans_file, trace_id, WORKER_SPANS)
    assert set(theirs) == WORKER_SPANS
    # ... Celery's run span a child of the publish, hypha's task span under it, each stage under that
    run = theirs["run/hypha.infer"]
    assert run["parent_id"] == f"0x{format_span_id(publish.context.span_id)}"
    task = theirs["hypha.task"]
    assert task["parent_id"] == run["context"]["span_id"]
    assert task["attributes"] == {"hypha.task": "hypha.infer", "hypha.task_id": result.id, "hypha.model": "mlp",
                                  "hypha.status": "ok"}
    for stage in ("hypha.verify", "hypha.validate", "hypha.admit", "hypha.run", "hypha.sign"):
        assert theirs[stage]["parent_id"] == task["context"]["span_id"], stage
    for part in ("hypha.load", "hypha.executor", "hypha.package"):
        assert theirs[part]["parent_id"] == theirs["hypha.run"]["context"]["span_id"], part
    assert theirs["hypha.executor"]["attributes"]["hypha.device"] == "cpu"
    assert {span["resource"]["attributes"]["service.name"] for span in theirs.values()} == {"hypha-worker-e2e"}
    assert all(span["status"]["status_code"] == "UNSET" for span in theirs.values())
