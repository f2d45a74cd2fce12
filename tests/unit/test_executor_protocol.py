"""The executor's wire protocol, without processes: each message survives its line, and the worker
reads an executor's error as the hypha error it names, with the executor's traceback kept."""

from __future__ import annotations

import json
import logging
import traceback

import pytest

from hypha_celery import errors
from hypha_celery.executor.process import error_from_reply
from hypha_celery.protocol import (
    ChildSettings,
    Describe,
    Description,
    Error,
    Fatal,
    GenerateResult,
    InferResult,
    Load,
    Loaded,
    ProtocolError,
    Ready,
    Reply,
    Request,
    TrainResult,
    Usage,
    decode_reply,
    decode_request,
)
from hypha_celery.work import Generate, Generated, Infer, JobLimits, Progress, Prompt, Streamed, Train, Trained

TRACEBACK = 'Traceback (most recent call last):\n  File "runtime.py", line 80, in _decode\nRuntimeError: shape\n'
USAGE = Usage(memory_peak=2**20, device="cpu", cpu_affinity=[0, 3], gpu_memory_peak=None)

REQUESTS: list[Request] = [
    Infer(model="mlp", items=[[[5.0, 3.4, 1.5, 0.2]], {"dtype": "float32", "shape": [4], "data": "AAAA"}],
          expected_size=1234, limits=JobLimits(memory=2**28, cores=[0, 1], gpu_memory=None)),
    Infer(model="mlp", items=[[1.0]]),
    Train(model="mlp", new_model="mlp-2", epochs=3, lr=0.01, batch_size=8, data={"inputs": [[1.0]], "targets": [0]},
          limits=JobLimits(memory=2**28)),
    Train(model="mlp", new_model="mlp-3", epochs=1, lr=0.1, batch_size=4, data_path="/store/six/data.json",
          progress_interval=0.0),
    Generate(model="tiny-llama", params={"max_new_tokens": 8, "stop": ["\n"]}, prompts=[Prompt(prompt="Once")],
             expected_size=4096, limits=JobLimits(memory=2**28)),
    Generate(model="tiny-llama", params={}, prompts=[Prompt(messages=[{"role": "user", "content": "hi"}]),
                                                     Prompt(prompt="Two")], progress_interval=0.0),
    Load(model="tiny-llama", expected_size=4096),
    Describe(),
]

REPLIES: list[Reply] = [
    Ready(pid=42),
    Progress(epoch=1, epochs=3, step=5, steps=15, loss=0.25, percent=33.33),
    Streamed(text="Once upon", tokens=2),
    Streamed(text="Two", tokens=1, index=3),
    Error(type="UnsupportedModel", message="model 'x' is not in the store"),
    Error(type="ExecutionError", message="RuntimeError: shape", traceback=TRACEBACK),
    Fatal(type="MemoryLimitExceeded", message="reached 900 MiB"),
    InferResult(outputs=[[0.1, 0.9], None], errors=[None, Error(type="ExecutionError", message="bad", traceback=TRACEBACK)],
                cache_hit=False, load_s=0.5, compute_s=0.01, batch_size=2, cache={"mlp": 1024}, usage=USAGE),
    TrainResult(model_id="mlp-2", trained=Trained(final_loss=0.1, loss_curve=[0.9, 0.1], epochs=2, steps=10, samples=40),
                load_s=0.2, usage=Usage(memory_peak=0, device="cuda:0", cpu_affinity=[1], gpu_memory_peak=4096)),
    GenerateResult(outputs=[Generated(text="Once upon a time", finish_reason="length", prompt_tokens=2,
                                      completion_tokens=4,
                                      proof={"version": 1, "tokens": [5, 6, 7, 8], "commitments": "AAEC"}), None],
                   errors=[None, Error(type="InvalidInput", message="the prompt is too long")],
                   time_to_first_token_s=0.01, compute_s=0.05, cache_hit=True, load_s=0.0, cache={"tiny-llama": 4096},
                   usage=USAGE, dtype="bfloat16"),
    Loaded(cache_hit=False, load_s=0.25, cache={"tiny-llama": 4096}),
    Description(pid=7, cache={}, net_namespace="net:[1]", interfaces=["lo"], nice=10, tmpdir="/tmp/x", cwd="/tmp/x",
                cuda_visible_devices="", environment=["PATH"], memory_mode="rlimit"),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_a_request_survives_its_line(request_: Request) -> None:
    # Given a request the worker sends, When it is encoded and the executor decodes the line
    decoded = decode_request(request_.encode())
    # Then the executor reads the same request, nested limits included
    assert decoded == request_


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_a_reply_survives_its_line(reply: Reply) -> None:
    # Given a reply an executor writes, When the worker decodes its line
    decoded = decode_reply(reply.encode())
    # Then it reads the same reply, of the same class (a Fatal stays a Fatal)
    assert decoded == reply and type(decoded) is type(reply)


@pytest.mark.parametrize("message", [*REQUESTS, *REPLIES], ids=lambda m: type(m).__name__)
def test_a_message_is_one_json_line(message: Request | Reply) -> None:
    # Given any message, even one carrying a multi-line traceback, When it is encoded
    line = message.encode()
    # Then it is one line of JSON tagged with its kind
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["kind"] == message.kind


def test_the_executor_reads_no_reply_as_a_request() -> None:
    # Given a reply's line, When the executor decodes it as a request, Then it is refused
    with pytest.raises(ProtocolError, match="not a message"):
        decode_request(Ready(pid=1).encode())


def test_the_worker_reads_no_request_as_a_reply() -> None:
    # Given a request's line, When the worker decodes it as a reply, Then it is refused
    with pytest.raises(ProtocolError, match="not a message"):
        decode_reply(Describe().encode())


@pytest.mark.parametrize("line", [
    b"not json\n",
    b"[1, 2]\n",
    b'{"ok": true, "result": {}}\n',
    b'{"kind": "ready"}\n',
    b'{"kind": "error", "type": "ExecutionError"}\n',
    b'{"kind": "infer_result", "outputs": [], "errors": [], "cache_hit": false, "load_s": 0, "compute_s": 0,'
    b' "batch_size": 0, "cache": {}, "usage": null}\n',
], ids=["not JSON", "not an object", "untagged", "missing pid", "missing message", "usage not an object"])
def test_a_malformed_reply_is_a_protocol_error(line: bytes) -> None:
    # Given a line that is not a well-formed reply, When the worker decodes it, Then it is a ProtocolError
    with pytest.raises(ProtocolError):
        decode_reply(line)


def test_a_reply_with_a_field_this_end_does_not_know_still_decodes() -> None:
    # Given a newer executor's reply with an extra field, When the worker decodes it
    reply = decode_reply(b'{"kind": "ready", "pid": 3, "python": "3.12"}\n')
    # Then it reads the fields it knows
    assert reply == Ready(pid=3)


def test_child_settings_survive_the_environment() -> None:
    # Given the settings an executor is started with, When they travel as JSON
    settings = ChildSettings(store="/models", cache_size=10**9, max_model_size=10**8, device="cuda:0", sandbox=True,
                             nice=10, memory_mode="watchdog", tmpdir="/tmp/hypha-serve-cuda0-x")
    # Then the executor reads the same settings
    assert ChildSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings


def test_an_error_reply_becomes_the_hypha_error_it_names() -> None:
    # Given an executor's error naming a hypha error class, When the worker reads it
    error = error_from_reply(Error(type="ModelTooLarge", message="model 'cnn' needs 1 GiB"), "serve-cpu")
    # Then it raises that class, with the executor's message
    assert type(error) is errors.ModelTooLarge and str(error) == "model 'cnn' needs 1 GiB"


@pytest.mark.parametrize("name", ["KeyError", "ConfigError", "NotHere", "DuplicateTask", "ControlFlow"])
def test_an_error_naming_no_single_message_hypha_error_is_an_execution_error(name: str) -> None:
    # Given an executor's error naming a class that is not a hypha error, or one not rebuilt from one message
    error = error_from_reply(Error(type=name, message="boom"), "serve-cpu")
    # Then the worker raises ExecutionError, with the message kept
    assert type(error) is errors.ExecutionError and str(error) == "boom"


def test_the_executors_traceback_is_chained_to_the_error_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    # Given an executor's error carrying the traceback of the task's code
    reply = Error(type="ExecutionError", message="RuntimeError: shape", traceback=TRACEBACK)
    # When the worker reads it
    with caplog.at_level(logging.WARNING, logger="hypha_celery.executor.process"):
        error = error_from_reply(reply, "serve-cpu")
    # Then the message stays one string (Celery rebuilds the error from it), the formatted traceback
    # (what the worker logs and Celery stores) shows the executor's frames, and the worker's log has it
    assert error.args == ("RuntimeError: shape",)
    assert 'in _decode\nRuntimeError: shape' in "".join(traceback.format_exception(error))
    assert "serve-cpu" in caplog.text and "in _decode" in caplog.text
