"""OpenAI response bodies, and Server-Sent Events in OpenAI's chunk format.

The bodies are built from a task's result (``output.text``, ``finish_reason``,
``usage``; ``output.embeddings``) without I/O. A stream is framed by :func:`sse` from
two things only: an async iterator of text deltas (whatever feeds them: a per-task
token stream, or PROGRESS polling) and a coroutine that returns the finished task's
:class:`Outcome`. The outcome's text is authoritative: whatever the deltas did not
carry of it is sent as one last delta, so the chunks always concatenate to the text a
non-streamed request returns. The stream ends with a chunk carrying ``finish_reason``,
then (``stream_options.include_usage``) a chunk with empty ``choices`` and the usage,
then ``data: [DONE]``. A failure after the first byte is an ``error`` event, which the
OpenAI SDKs raise as ``APIError``.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hypha_celery.gateway.errors import from_exception

__all__ = ["Outcome", "chat_body", "completion_id", "embeddings_body", "models_body", "outcome_of", "sse", "text_body"]

Kind = Literal["chat", "text"]


@dataclass(frozen=True)
class Outcome:
    """A finished generation: what a response body or the end of a stream reports."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def outcome_of(result: Any) -> Outcome:
    """The outcome in a ``hypha.generate`` result."""
    output = result["output"]
    usage = output.get("usage", {})
    return Outcome(text=output["text"], finish_reason=output.get("finish_reason", "stop"),
                   prompt_tokens=int(usage.get("prompt_tokens", 0)), completion_tokens=int(usage.get("completion_tokens", 0)))


def completion_id(kind: Kind) -> str:
    """A fresh response id in OpenAI's style."""
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def _usage(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """One prompt (every choice read the same), every choice's completion."""
    prompt = outcomes[0].prompt_tokens if outcomes else 0
    completion = sum(o.completion_tokens for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_body(response_id: str, model: str, outcomes: Sequence[Outcome], created: int | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object, one choice per outcome."""
    return {
        "id": response_id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
        "system_fingerprint": None,
        "choices": [{"index": i, "message": {"role": "assistant", "content": o.text, "refusal": None},
                     "logprobs": None, "finish_reason": o.finish_reason} for i, o in enumerate(outcomes)],
        "usage": _usage(outcomes),
    }


def text_body(response_id: str, model: str, outcomes: Sequence[Outcome], created: int | None = None) -> dict[str, Any]:
    """A ``text_completion`` object, one choice per outcome."""
    return {
        "id": response_id, "object": "text_completion", "created": created or int(time.time()), "model": model,
        "system_fingerprint": None,
        "choices": [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                    for i, o in enumerate(outcomes)],
        "usage": _usage(outcomes),
    }


def embeddings_body(model: str, vectors: Sequence[Sequence[float]], encoding_format: str) -> dict[str, Any]:
    """A ``list`` of ``embedding`` objects; ``base64`` packs each vector as little-endian float32, as OpenAI does.
    The worker reports no token counts for embeddings, so usage is zero."""
    def encode(vector: Sequence[float]) -> Any:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        return list(vector)

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": 0, "total_tokens": 0}}


def models_body(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A ``list`` of ``model`` objects (OpenAI's four fields, then what the registry says about each)."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "hypha", **extra}
                                       for model, extra in sorted(models.items())]}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _chunk(kind: Kind, response_id: str, model: str, created: int, *, delta: str | None = None, role: bool = False,
           finish_reason: str | None = None) -> dict[str, Any]:
    if kind == "chat":
        content: dict[str, Any] = {}
        if role:
            content["role"] = "assistant"
        if delta is not None:
            content["content"] = delta
        choice: dict[str, Any] = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
        return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None, "choices": [choice]}
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}]}


async def sse(kind: Kind, model: str, deltas: AsyncIterator[str], outcome: Callable[[], Awaitable[Outcome]], *,
              include_usage: bool = False, response_id: str | None = None) -> AsyncIterator[str]:
    """The events of one streamed choice, ``data: [DONE]`` last; an error after the start is an ``error`` event."""
    response_id = response_id or completion_id(kind)
    created = int(time.time())
    sent = ""
    if kind == "chat":
        yield _event(_chunk(kind, response_id, model, created, delta="", role=True))
    try:
        async for delta in deltas:
            if delta:
                sent += delta
                yield _event(_chunk(kind, response_id, model, created, delta=delta))
        done = await outcome()
    except Exception as exc:  # the status line is long gone: report it in the stream, as OpenAI does
        yield _event(from_exception(exc).body())
        return
    if done.text.startswith(sent) and len(done.text) > len(sent):
        yield _event(_chunk(kind, response_id, model, created, delta=done.text[len(sent):]))
    yield _event(_chunk(kind, response_id, model, created, finish_reason=done.finish_reason))
    if include_usage:
        usage = {**_chunk(kind, response_id, model, created), "choices": [], "usage": _usage([done])}
        yield _event(usage)
    yield "data: [DONE]\n\n"
