"""One trace per request: OpenTelemetry spans from the gateway or a scheduler, through the worker's stages.

Why one module: tracing is optional (the ``[otel]`` extra) and must cost nothing when it is off,
so every OpenTelemetry import and decision lives here. The rest of the code holds a
:class:`Tracing` collaborator (the worker's in its :class:`~hypha_celery.worker.context.NodeContext`,
the gateway's in its ``Gateway``) and opens spans with :meth:`Tracing.span`; an off ``Tracing``
answers with one do-nothing object, so a stage pays a method call, not a span.

Turned on by the standard ``OTEL_*`` environment (no TOML section: the SDK's own variables
already say where spans go): ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) exports
over OTLP/HTTP; ``OTEL_TRACES_EXPORTER=console`` prints them; ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` keeps it off. ``HYPHA_TRACES_FILE=<path>`` appends each span as a JSON
line to a file (tests and debugging read them back). :func:`from_env` sets OTel's global tracer
provider (the only process-wide state, OTel's own). A scheduler or the gateway traces its publishes
(:meth:`Tracing.trace_publishes`): an ``apply_async/<task>`` span whose context travels in the message's
``traceparent`` header. Not ``opentelemetry-instrumentation-celery``'s publish span there: it looks the task
up in the process's task registry, where a scheduler that sends by name (``send_task``) has none, and then
never ends its span and leaves it current. The worker, whose tasks are registered, is instrumented with it
(``CeleryInstrumentor``): its ``run/<task>`` span continues the message's trace, with hypha's stage spans
(``hypha.task`` → ``hypha.verify``, ``hypha.validate``, ``hypha.admit``, ``hypha.run`` → ``hypha.load``,
``hypha.executor``, ``hypha.package``; then ``hypha.sign``) beneath. Importing this module does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from celery import signals
from celery.exceptions import Ignore, Reject, Retry

__all__ = ["TRACES_FILE", "Span", "Tracing", "from_env", "wanted"]

log = logging.getLogger(__name__)

TRACES_FILE = "HYPHA_TRACES_FILE"
# Raised on purpose to defer, drop a copy or retry a task: an outcome, not an error.
_NOT_ERRORS: dict[type[BaseException], str] = {Ignore: "ignored", Retry: "retry", Reject: "rejected"}


class Span:
    """An open span: :meth:`set` adds an attribute. The base class is the off one, which does nothing."""

    def set(self, key: str, value: Any) -> None:
        """Record ``key`` on the span (None values are skipped)."""

    def __enter__(self) -> Span:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None


class _Live(Span):
    """A recording span, current while open; an exception marks it failed unless it is a deferral (``Ignore``...)."""

    def __init__(self, tracer: Any, name: str, attributes: Mapping[str, Any] | None, kind: Any = None,
                 context: Any = None) -> None:
        self._manager = tracer.start_as_current_span(name, context=context, attributes=_clean(attributes or {}),
                                                     record_exception=False, set_status_on_exception=False,
                                                     **({"kind": kind} if kind is not None else {}))
        self._span: Any = None

    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self._span.set_attribute(key, value if isinstance(value, (str, bool, int, float)) else str(value))

    def __enter__(self) -> Span:
        self._span = self._manager.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        if exc is None:
            self._span.set_attribute("hypha.status", "ok")
        elif outcome := next((name for cls, name in _NOT_ERRORS.items() if isinstance(exc, cls)), None):
            self._span.set_attribute("hypha.status", outcome)
        else:
            self._span.set_attribute("hypha.status", "error")
            self._span.record_exception(exc)
            self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self._manager.__exit__(kind, exc, tb)


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value if isinstance(value, (str, bool, int, float)) else str(value)
            for key, value in attributes.items() if value is not None}


class Tracing:
    """Where spans go: nowhere (``Tracing()``, the default) or an OpenTelemetry tracer provider's tracer."""

    def __init__(self, provider: Any = None) -> None:
        self.provider = provider
        self._tracer = None if provider is None else provider.get_tracer("hypha_celery")
        self._off = Span()

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, attributes: Mapping[str, Any] | None = None) -> Span:
        """A span named ``name``, child of the current one, with ``attributes`` (OTel keys: ``hypha.model``...)."""
        if self._tracer is None:
            return self._off
        return _Live(self._tracer, name, attributes)

    def server_span(self, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any] | None = None) -> Span:
        """A request's span, continuing the trace its ``traceparent`` header names (a client that traces)."""
        if self._tracer is None:
            return self._off
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        return _Live(self._tracer, name, attributes, kind=SpanKind.SERVER, context=extract(dict(carrier)))

    def trace_publishes(self) -> Callable[[], None]:
        """Trace every Celery publish of this process (a scheduler's, the gateway's); returns the undo."""
        if self._tracer is None:
            return lambda: None
        publishes = _Publishes(self._tracer)
        signals.before_task_publish.connect(publishes.before, weak=False)
        signals.after_task_publish.connect(publishes.after, weak=False)

        def undo() -> None:
            signals.before_task_publish.disconnect(publishes.before)
            signals.after_task_publish.disconnect(publishes.after)
        return undo

    def close(self) -> None:
        """Export what is buffered and stop the exporters."""
        provider, self.provider = self.provider, None
        if provider is not None:
            provider.shutdown()


class _Publishes:
    """One ``apply_async/<task>`` PRODUCER span per message, from ``before_task_publish`` to ``after_task_publish``;
    the message's headers carry its context (W3C ``traceparent``), which the worker's instrumentation continues."""

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer
        self._open: dict[str, Any] = {}  # task id -> its publish span, until the broker took the message
        self._lock = threading.Lock()

    def before(self, sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        task_id = None if headers is None else headers.get("id")
        if headers is None or not isinstance(task_id, str):
            return
        from opentelemetry.propagate import inject
        from opentelemetry.trace import SpanKind, set_span_in_context

        name = str(sender)
        span = self._tracer.start_span(f"apply_async/{name}", kind=SpanKind.PRODUCER, attributes={
            "celery.action": "apply_async", "celery.task_name": name, "messaging.message.id": task_id})
        inject(headers, context=set_span_in_context(span))
        with self._lock:
            self._open[task_id] = span

    def after(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        task_id = None if headers is None else headers.get("id")
        with self._lock:
            span = self._open.pop(task_id, None) if isinstance(task_id, str) else None
        if span is not None:
            span.end()


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces (an exporter configured and the SDK not disabled)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporters(environ)
    return (bool(exporters) and exporters != ["none"]) or bool(environ.get(TRACES_FILE))


def _exporters(environ: Mapping[str, str]) -> list[str]:
    named = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if named:
        return named
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return ["otlp"] if endpoint else []


def from_env(service_name: str, environ: Mapping[str, str] = os.environ, *, worker: bool = False) -> Tracing:
    """Tracing as the environment asks (see the module docstring); off when not asked or without ``[otel]``.

    When on, OTel's global tracer provider is set, and this process's publishes carry their trace (``worker``:
    Celery instrumented, so the tasks run here continue their message's trace too). ``OTEL_SERVICE_NAME``
    overrides ``service_name``. A Python scheduler calls it once: ``from_env("my-scheduler")``.
    """
    if not wanted(environ):
        return Tracing()
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        log.warning("tracing asked for by OTEL_* but the [otel] extra is not installed (%s): no traces", exc)
        return Tracing()
    resource = Resource.create({} if environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name})
    provider = TracerProvider(resource=resource)
    for name in _exporters(environ):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name != "none":
            log.warning("OTEL_TRACES_EXPORTER=%s: hypha exports only otlp and console; ignored", name)
    if path := environ.get(TRACES_FILE):
        provider.add_span_processor(SimpleSpanProcessor(_file_exporter(path)))
    trace.set_tracer_provider(provider)
    tracing = Tracing(provider)
    if worker:
        CeleryInstrumentor().instrument(tracer_provider=provider)
    else:
        tracing.trace_publishes()
    log.info("tracing on: %s exports spans (%s)", service_name, ", ".join(_exporters(environ) + ([path] if path else [])))
    return tracing


def _file_exporter(path: str) -> Any:
    """Spans appended to ``path`` as JSON lines (one ``write`` each, so processes may share the file)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class FileExporter(SpanExporter):
        def __init__(self) -> None:
            self._lock = threading.Lock()

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            lines = "".join(span.to_json(indent=None) + "\n" for span in spans)
            with self._lock, open(path, "a", encoding="utf-8") as out:
                out.write(lines)
            return SpanExportResult.SUCCESS

    return FileExporter()
