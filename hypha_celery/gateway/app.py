"""The ASGI app: OpenAI's routes, each one authenticate → rate-limit → translate → submit → answer.

Starlette, not FastAPI: OpenAI's bodies are read by :mod:`.translate` (whose errors
must be OpenAI's 400s naming the parameter, where FastAPI would answer its own 422),
so FastAPI's pydantic layer would only add a dependency and a second validator.
Blocking calls into the network run in Starlette's thread pool. A streamed response
is framed by :func:`.responses.sse`; when the client leaves before its end, the task
is revoked.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hypha_celery.client import HyphaResult
from hypha_celery.gateway.auth import ApiKeys
from hypha_celery.gateway.errors import ApiError, from_exception
from hypha_celery.gateway.network import Network
from hypha_celery.gateway.ratelimit import RateLimiter
from hypha_celery.gateway.responses import (
    Outcome,
    chat_body,
    completion_id,
    embeddings_body,
    models_body,
    outcome_of,
    sse,
    text_body,
)
from hypha_celery.gateway.translate import (
    GenerateCall,
    chat_request,
    check_dimensions,
    completion_request,
    embeddings_request,
)
from hypha_celery.monitoring.tracing import Tracing

__all__ = ["Gateway", "TaskStream", "create_app"]

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
_ANONYMOUS = "anonymous"  # the rate-limit identity of every request when the gateway takes no keys


@dataclass
class Gateway:
    """What the routes use: the network, the accepted keys (None: open), the rate limiter (None: none) and where
    each request's span goes (off by default; its publish and the worker's stages continue its trace)."""

    network: Network
    keys: ApiKeys | None
    limiter: RateLimiter | None
    tracing: Tracing = field(default_factory=Tracing)

    async def admit(self, request: Request) -> None:
        """401 without an accepted bearer key; 429 (with ``Retry-After``) past the key's rate."""
        key_id = _ANONYMOUS
        if self.keys is not None:
            found = self.keys.identify(request.headers.get("authorization"))
            if found is None:
                raise ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                               code="invalid_api_key")
            key_id = found
        if self.limiter is not None:
            wait = await run_in_threadpool(self.limiter.take, key_id)
            if wait > 0:
                raise ApiError(429, f"Rate limit reached for this API key; retry in {wait:.1f}s",
                               type="requests", code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})

    async def known_model(self, model: str) -> None:
        """404 for a model no live worker holds."""
        if model not in await run_in_threadpool(self.network.models):
            raise ApiError(404, f"The model {model!r} does not exist or no live worker holds it",
                           param="model", code="model_not_found")

    async def submit(self, task: str, kwargs: dict[str, Any]) -> HyphaResult:
        return await run_in_threadpool(self.network.submit, task, kwargs)

    async def wait(self, result: HyphaResult) -> dict[str, Any]:
        return await run_in_threadpool(self.network.wait, result)


def _answer(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


def _route(handler: Callable[[Gateway, Request], Awaitable[Response]], gateway: Gateway
           ) -> Callable[[Request], Awaitable[Response]]:
    """Every failure answered in OpenAI's error shape (a tracebacks stays in the log)."""
    async def endpoint(request: Request) -> Response:
        path = request.url.path
        with gateway.tracing.server_span(f"{request.method} {path}", request.headers,
                                         {"http.request.method": request.method, "url.path": path}) as span:
            try:
                await gateway.admit(request)
                response = await handler(gateway, request)
            except Exception as exc:
                error = from_exception(exc)
                if error.status >= 500 and not isinstance(exc, ApiError):
                    log.warning("%s %s: %s: %s", request.method, path, type(exc).__name__, exc)
                response = _answer(error)
            span.set("http.response.status_code", response.status_code)
            return response
    return endpoint


async def list_models(gateway: Gateway, request: Request) -> Response:
    return JSONResponse(models_body(await run_in_threadpool(gateway.network.models)))


async def _generate(gateway: Gateway, request: Request, call: GenerateCall, kind: str) -> Response:
    await gateway.known_model(call.model)
    results = [await gateway.submit("hypha.generate", call.choice_kwargs(i)) for i in range(call.n)]
    response_id = completion_id("chat" if kind == "chat" else "text")
    if call.stream:
        return _stream(gateway, call, kind, results[0], response_id)
    outcomes = await _outcomes_while_connected(gateway, request, results)
    body = chat_body if kind == "chat" else text_body
    return JSONResponse(body(response_id, call.model, outcomes))


async def _outcomes_while_connected(gateway: Gateway, request: Request, results: list[HyphaResult]) -> list[Outcome]:
    """Each choice's outcome; a client that leaves first has its tasks revoked (none runs on for nobody).

    Every choice was sent before the first wait: they run together, so waiting in turn costs nothing more.
    The connection is checked every :data:`DISCONNECT_POLL_S` while they run.
    """
    outcomes: list[Outcome] = []
    left = False
    failed: list[Exception] = []  # a task's error, raised as itself (not wrapped in the task group's ExceptionGroup)
    async with anyio.create_task_group() as group:
        async def collect() -> None:
            try:
                for result in results:  # a wait abandoned when the client leaves: its thread ends with the revoke
                    outcomes.append(outcome_of(await anyio.to_thread.run_sync(gateway.network.wait, result,
                                                                              abandon_on_cancel=True)))
            except Exception as exc:
                failed.append(exc)
            group.cancel_scope.cancel()

        async def watch() -> None:
            nonlocal left
            while not await request.is_disconnected():
                await anyio.sleep(DISCONNECT_POLL_S)
            left = True
            group.cancel_scope.cancel()

        group.start_soon(collect)
        group.start_soon(watch)
    if failed:
        raise failed[0]
    if left:
        log.info("client left before its %d generation(s) ended: revoking them", len(results))
        with anyio.CancelScope(shield=True):
            for result in results:
                await run_in_threadpool(gateway.network.revoke, result)
        raise ApiError(499, "the client closed the request", code="client_closed_request")
    return outcomes


class TaskStream(StreamingResponse):
    """A task's Server-Sent Events: when the response ends before its last event (the client left, however the
    server reports it: a cancelled send or a failed one), the task is revoked."""

    def __init__(self, events: AsyncIterator[str], abandon: Callable[[], Awaitable[None]]) -> None:
        self.complete = False
        self._events = events
        self._abandon = abandon
        super().__init__(self._body(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _body(self) -> AsyncIterator[str]:
        async for event in self._events:
            yield event
        self.complete = True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.complete:  # its task must not run on for nobody
                with anyio.CancelScope(shield=True):
                    await self._abandon()


def _stream(gateway: Gateway, call: GenerateCall, kind: str, result: HyphaResult, response_id: str) -> Response:
    async def outcome() -> Outcome:
        return outcome_of(await gateway.wait(result))

    async def abandon() -> None:
        log.info("client left the stream of task %s: revoking it", result.id)
        await run_in_threadpool(gateway.network.revoke, result)

    events = sse("chat" if kind == "chat" else "text", call.model, iterate_in_threadpool(gateway.network.deltas(result)),
                 outcome, include_usage=call.include_usage, response_id=response_id)
    return TaskStream(events, abandon)


async def chat_completions(gateway: Gateway, request: Request) -> Response:
    return await _generate(gateway, request, chat_request(await _json(request)), "chat")


async def completions(gateway: Gateway, request: Request) -> Response:
    return await _generate(gateway, request, completion_request(await _json(request)), "text")


async def embeddings(gateway: Gateway, request: Request) -> Response:
    call = embeddings_request(await _json(request))
    await gateway.known_model(call.model)
    output = (await gateway.wait(await gateway.submit("hypha.infer", {"model": call.model, "texts": call.texts})))["output"]
    vectors = output.get("embeddings")
    if not isinstance(vectors, list) or len(vectors) != len(call.texts):
        raise ApiError(400, f"model {call.model!r} does not embed texts (it answered no embeddings)",
                       param="model", code="not_an_embedding_model")
    check_dimensions(call, int(output.get("dim", len(vectors[0]))))
    return JSONResponse(embeddings_body(call.model, vectors, call.encoding_format))


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return _answer(ApiError(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'error')}",
                            code="not_found" if status == 404 else None))


def create_app(gateway: Gateway) -> Starlette:
    """The gateway's ASGI app over ``gateway``'s network, keys and limiter."""
    routes = [
        Route("/v1/models", _route(list_models, gateway), methods=["GET"]),
        Route("/v1/chat/completions", _route(chat_completions, gateway), methods=["POST"]),
        Route("/v1/completions", _route(completions, gateway), methods=["POST"]),
        Route("/v1/embeddings", _route(embeddings, gateway), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _not_found})
