"""The gateway without a network: key files, the error table, request translation, SSE framing, the token bucket,
and the routes over a fake network (Starlette's test client)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import fakeredis
import pytest
from starlette.testclient import TestClient

from hypha_celery.errors import (
    ConfigError,
    ExecutionError,
    InsufficientCpu,
    InvalidInput,
    ModelPinMismatch,
    RegistryUnavailable,
    TaskTimeout,
    UnsupportedModel,
)
from hypha_celery.gateway.app import Gateway, create_app
from hypha_celery.gateway.auth import ApiKeys, digest
from hypha_celery.gateway.errors import ApiError, from_exception
from hypha_celery.gateway.ratelimit import RateLimiter
from hypha_celery.gateway.responses import Outcome, embeddings_body, sse
from hypha_celery.gateway.translate import chat_request, completion_request, embeddings_request
from hypha_celery.keys import KeySchema

# --- key files


def test_a_key_file_takes_plain_keys_and_sha256_digests() -> None:
    # Given a file with a plain key, a digest of another, a comment and a blank line
    text = f"# ops team\nsk-plain\n\nsha256:{hashlib.sha256(b'sk-hashed').hexdigest().upper()}\n"
    keys = ApiKeys.parse(text)
    # Then both keys are accepted as bearer tokens, and their identity is their digest
    assert keys.identify("Bearer sk-plain") == digest("sk-plain")
    assert keys.identify("bearer sk-hashed") == digest("sk-hashed")
    # And anything else is not
    for header in (None, "", "Bearer", "Bearer sk-other", "Basic sk-plain", "sk-plain",
                   f"Bearer sha256:{digest('sk-hashed')}"):
        assert keys.identify(header) is None


@pytest.mark.parametrize(("text", "where"), [
    ("sha256:abc\n", "keys:1"), ("ok\nsha256:" + "g" * 64, "keys:2"), ("two words", "keys:1"), ("# none\n\n", "keys"),
])
def test_a_malformed_key_file_names_the_line(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ApiKeys.parse(text, "keys")
    assert where in str(caught.value)


# --- the error table


@pytest.mark.parametrize(("exc", "status", "code"), [
    (InvalidInput("bad"), 400, "invalid_input"),
    (UnsupportedModel("no such model"), 404, "model_not_found"),
    (ModelPinMismatch("other manifest"), 409, "model_pin_mismatch"),
    (InsufficientCpu("too many cores"), 503, "insufficient_capabilities"),
    (TaskTimeout("ran too long"), 504, "timeout"),
    (RegistryUnavailable("down"), 503, "registry_unavailable"),
    (ExecutionError("torch"), 500, "execution_error"),
    (KeyError("x"), 500, "internal_error"),
])
def test_named_errors_map_to_statuses_through_their_ancestry(exc: Exception, status: int, code: str) -> None:
    error = from_exception(exc)
    assert (error.status, error.code) == (status, code)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_an_error_rebuilt_by_name_maps_like_the_class() -> None:
    # Given an exception class the result backend made up from a name (the client lacks the module)
    lookalike = type("InsufficientCapabilities", (Exception,), {})
    # Then it maps like hypha's own, and Celery's TimeoutError (by name) is a 504
    assert from_exception(lookalike("no worker fits")).status == 503
    assert from_exception(type("TimeoutError", (Exception,), {})("late")).status == 504


# --- request translation


def test_a_greedy_chat_request_becomes_hypha_generate_messages() -> None:
    call = chat_request({"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                         "temperature": 0, "max_completion_tokens": 8, "stop": "\n", "seed": 3, "user": "u1"})
    assert call.kwargs == {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Hi"}],
                           "max_new_tokens": 8, "do_sample": False, "stop": ["\n"], "seed": 3}
    assert (call.n, call.stream) == (1, False)


def test_sampling_follows_openai_defaults_and_seeds_each_choice() -> None:
    call = chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3, "seed": 10, "top_p": 0.9})
    assert call.kwargs | {"messages": None} == {"model": "m", "messages": None, "do_sample": True, "temperature": 1.0,
                                                "top_k": 0, "top_p": 0.9, "seed": 10}
    assert [call.choice_kwargs(i)["seed"] for i in range(3)] == [10, 11, 12]


def test_a_text_completion_defaults_to_16_tokens_and_one_prompt() -> None:
    call = completion_request({"model": "m", "prompt": ["Once"], "stream": True,
                               "stream_options": {"include_usage": True}, "echo": False, "logprobs": None})
    assert call.kwargs["prompt"] == "Once" and call.kwargs["max_new_tokens"] == 16
    assert (call.stream, call.include_usage) == (True, True)


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 9}, "n"),
    ({"n": 2, "stream": True}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": ""}, "model"),
])
def test_a_parameter_that_cannot_be_honoured_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    assert (caught.value.status, caught.value.param) == (400, param)


def test_text_response_format_and_neutral_values_are_accepted() -> None:
    call = chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 0,
                         "response_format": {"type": "text"}, "logprobs": False, "n": None})
    assert call.n == 1 and "response_format" not in call.kwargs


def test_a_json_format_goes_to_hypha_generate_as_sent() -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    for fmt in ({"type": "json_object"}, schema_format):
        call = chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": fmt})
        assert call.kwargs["response_format"] == fmt


def test_embeddings_take_a_string_or_a_list_of_strings() -> None:
    assert embeddings_request({"model": "e", "input": "one"}).texts == ["one"]
    assert embeddings_request({"model": "e", "input": ["a", "b"], "encoding_format": "base64"}).encoding_format == "base64"
    for body, param in (({"input": [[1, 2]]}, "input"), ({"input": []}, "input"), ({"encoding_format": "int8"},
                                                                                     "encoding_format")):
        with pytest.raises(ApiError) as caught:
            embeddings_request({"model": "e", "input": "x", **body})
        assert caught.value.param == param


def test_base64_embeddings_are_little_endian_float32() -> None:
    body = embeddings_body("e", [[0.5, -1.0]], "base64")
    assert struct.unpack("<2f", base64.b64decode(body["data"][0]["embedding"])) == (0.5, -1.0)


# --- SSE framing


async def _deltas(*parts: str) -> AsyncIterator[str]:
    for part in parts:
        yield part


def _events(kind: str, parts: tuple[str, ...], done: Outcome, include_usage: bool) -> list[str]:
    async def outcome() -> Outcome:
        return done

    async def collect() -> list[str]:
        return [event async for event in sse(kind, "m", _deltas(*parts), outcome,  # type: ignore[arg-type]
                                             include_usage=include_usage, response_id="id-1")]
    return asyncio.run(collect())


def test_chat_chunks_concatenate_to_the_outcome_and_end_with_usage_then_done() -> None:
    # Given deltas that miss the outcome's last piece
    events = _events("chat", ("Hel", "", "lo"), Outcome("Hello!", "stop", 3, 2), True)
    # Then every event is data: JSON, [DONE] last
    assert events[-1] == "data: [DONE]\n\n" and all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello!"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and {c["id"] for c in chunks} == {"id-1"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2,
                                                                    "total_tokens": 5}


def test_text_chunks_carry_text_and_no_usage_unless_asked() -> None:
    events = _events("text", ("a", "b"), Outcome("ab", "length", 1, 2), False)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", ""]
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_failure_mid_stream_is_an_error_event() -> None:
    async def failing() -> Outcome:
        raise TaskTimeout("ran past task_timeout")

    async def collect() -> list[str]:
        return [event async for event in sse("chat", "m", _deltas("x"), failing)]
    events = asyncio.run(collect())
    assert json.loads(events[-1][6:])["error"]["code"] == "timeout"


# --- the token bucket


def test_the_bucket_allows_a_burst_then_refuses_with_a_wait() -> None:
    limiter = RateLimiter(fakeredis.FakeRedis(), per_minute=60, burst=2, schema=KeySchema("{t}"))
    assert limiter.take("k") == 0.0 and limiter.take("k") == 0.0
    wait = limiter.take("k")
    assert 0 < wait <= 1.0
    # Another key has its own bucket
    assert limiter.take("other") == 0.0


# --- the routes over a fake network


class Handle(dict):  # type: ignore[type-arg]
    """A submitted task's kwargs, as the fake network's result handle."""

    id = "task-1"


class FakeNetwork:
    """Holds models "gen" and "emb"; generate answers the prompt reversed, infer unit vectors."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.revoked: list[str] = []

    def models(self) -> dict[str, dict[str, Any]]:
        return {"gen": {"workers": 1, "loaded": 1}, "emb": {"workers": 1, "loaded": 0}}

    def submit(self, task: str, kwargs: dict[str, Any]) -> Any:
        if kwargs.get("max_new_tokens") == 999:
            raise InsufficientCpu("no worker has that many cores")
        self.sent.append((task, kwargs))
        return Handle(kwargs)

    def wait(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if "texts" in kwargs:
            return {"output": {"embeddings": [[1.0, 0.0]] * len(kwargs["texts"]), "dim": 2}}
        text = (kwargs.get("prompt") or kwargs["messages"][-1]["content"])[::-1]
        return {"output": {"text": text, "finish_reason": "stop", "usage": {"prompt_tokens": 4,
                                                                            "completion_tokens": len(text)}}}

    def deltas(self, kwargs: dict[str, Any]) -> Iterator[str]:
        yield from self.wait(kwargs)["output"]["text"]

    def revoke(self, kwargs: dict[str, Any]) -> None:
        self.revoked.append(str(kwargs))


@pytest.fixture
def fake() -> FakeNetwork:
    return FakeNetwork()


@pytest.fixture
def http(fake: FakeNetwork) -> Iterator[TestClient]:
    limiter = RateLimiter(fakeredis.FakeRedis(), per_minute=60, burst=5, schema=KeySchema("{t}"))
    app = create_app(Gateway(network=fake, keys=ApiKeys.parse("sk-good"), limiter=limiter))  # type: ignore[arg-type]
    with TestClient(app, headers={"Authorization": "Bearer sk-good"}) as client:
        yield client


def test_routes_answer_in_openai_shapes(http: TestClient, fake: FakeNetwork) -> None:
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["emb", "gen"]
    chat = http.post("/v1/chat/completions", json={"model": "gen", "messages": [{"role": "user", "content": "abc"}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "cba"
    assert chat.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    text = http.post("/v1/completions", json={"model": "gen", "prompt": "xy", "n": 2, "seed": 1})
    assert [c["text"] for c in text.json()["choices"]] == ["yx", "yx"]
    assert [kwargs["seed"] for _, kwargs in fake.sent[-2:]] == [1, 2]
    embedded = http.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"]}).json()
    assert [d["embedding"] for d in embedded["data"]] == [[1.0, 0.0], [1.0, 0.0]]


def test_a_stream_is_server_sent_events_ending_done(http: TestClient) -> None:
    with http.stream("POST", "/v1/chat/completions", json={"model": "gen", "stream": True,
                                                          "messages": [{"role": "user", "content": "abc"}]}) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines[:-1]) == "cba"


@pytest.mark.parametrize(("headers", "path", "body", "status", "code"), [
    ({"Authorization": "Bearer sk-bad"}, "/v1/models", None, 401, "invalid_api_key"),
    ({"Authorization": ""}, "/v1/models", None, 401, "invalid_api_key"),
    ({}, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model_not_found"),
    ({}, "/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 2}},
     400, "unsupported_parameter"),
    ({}, "/v1/completions", {"model": "gen", "prompt": "x", "max_tokens": 999}, 503, "insufficient_capabilities"),
    ({}, "/v1/nowhere", None, 404, "not_found"),
])
def test_errors_have_openai_shape_and_status(http: TestClient, headers: dict[str, str], path: str,
                                             body: dict[str, Any] | None, status: int, code: str) -> None:
    answer = http.post(path, json=body, headers=headers) if body is not None else http.get(path, headers=headers)
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code


def test_invalid_json_is_a_400(http: TestClient) -> None:
    answer = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert (answer.status_code, answer.json()["error"]["code"]) == (400, "invalid_json")


def test_past_the_burst_a_key_gets_429_with_retry_after(http: TestClient) -> None:
    statuses = [http.get("/v1/models").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    answer = http.get("/v1/models")
    assert answer.json()["error"]["code"] == "rate_limit_exceeded" and int(answer.headers["Retry-After"]) >= 1


def receiver(body: bytes, gone: asyncio.Event) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI ``receive``: the request's body once, then the client's disconnect once ``gone`` is set."""
    requests = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


def completions_scope() -> dict[str, Any]:
    """The ASGI scope of a POST /v1/completions (what a server hands the app)."""
    return {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b"",
            "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "scheme": "http",
            "server": ("test", 80), "client": ("test", 1), "root_path": ""}


def test_a_client_that_leaves_mid_stream_revokes_its_task(fake: FakeNetwork) -> None:
    # Given a generation that goes on and on
    def endless(kwargs: dict[str, Any]) -> Iterator[str]:
        while True:
            time.sleep(0.01)
            yield "x"

    fake.deltas = endless  # type: ignore[method-assign]
    app = create_app(Gateway(network=fake, keys=None, limiter=None))  # type: ignore[arg-type]
    body = json.dumps({"model": "gen", "prompt": "go", "stream": True}).encode()
    sent: list[dict[str, Any]] = []
    streaming = asyncio.Event()
    receive = receiver(body, streaming)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and len(sent) > 3:
            streaming.set()

    scope = completions_scope()
    # When the client disconnects after a few chunks
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    # Then the response ended without [DONE], and the task was revoked
    assert sent[0]["status"] == 200 and not any(b"[DONE]" in m.get("body", b"") for m in sent)
    assert len(fake.revoked) == 1


def test_a_client_that_leaves_before_a_non_streamed_reply_revokes_its_tasks(fake: FakeNetwork,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Given two generations (n=2) that end only when revoked
    import hypha_celery.gateway.app as gateway_app

    monkeypatch.setattr(gateway_app, "DISCONNECT_POLL_S", 0.01)
    revoked = threading.Event()

    def wait_until_revoked(kwargs: dict[str, Any]) -> dict[str, Any]:
        revoked.wait(10)
        raise RuntimeError("revoked")

    fake.wait = wait_until_revoked  # type: ignore[method-assign]
    fake.revoke = lambda kwargs: (FakeNetwork.revoke(fake, kwargs), revoked.set())  # type: ignore[method-assign]
    app = create_app(Gateway(network=fake, keys=None, limiter=None))  # type: ignore[arg-type]
    body = json.dumps({"model": "gen", "prompt": "go", "n": 2}).encode()
    left = asyncio.Event()
    receive = receiver(body, left)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = completions_scope()

    async def main() -> None:
        serving = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.sleep(0.2)  # both tasks were sent and are being waited on
        assert len(fake.sent) == 2 and not fake.revoked
        # When the client disconnects
        left.set()
        await asyncio.wait_for(serving, 10)

    asyncio.run(main())
    # Then both tasks were revoked, and no reply with a result was sent
    assert len(fake.revoked) == 2
    assert not any(b"choices" in m.get("body", b"") for m in sent)


def test_a_worker_side_error_on_a_non_streamed_request_keeps_its_status(fake: FakeNetwork) -> None:
    # Given a generation that fails on the worker with a named error
    def refused(kwargs: dict[str, Any]) -> dict[str, Any]:
        raise InsufficientCpu("no worker has that many cores")

    fake.wait = refused  # type: ignore[method-assign]
    app = create_app(Gateway(network=fake, keys=None, limiter=None))  # type: ignore[arg-type]
    with TestClient(app) as client:
        answer = client.post("/v1/completions", json={"model": "gen", "prompt": "x"})
    # Then it is answered with that error's status and code, not a 500 about the waiting
    assert (answer.status_code, answer.json()["error"]["code"]) == (503, "insufficient_capabilities")
