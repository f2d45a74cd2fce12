"""A corpus of bad inputs sent to ONE real worker that verifies signatures.

Every bad message must fail with the named error (or, for messages kombu
refuses before any task code, stay PENDING with the reason in the worker's
log); no bad task may reserve anything or run; the worker must stay up; and
valid signed tasks sent in between must all succeed.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from hypha_celery import keys
from hypha_celery.harness.launch import wait_for
from hypha_celery.resources.ledger import Ledger
from hypha_celery.security import ENVELOPE_HEADER, canonical, generate_key, peer_id, sign_envelope, signed_options

NODE = "corpus-node"
MAX_INPUT_BYTES = 64 * 1024
ROW = [5.0, 3.4, 1.5, 0.2]
VALID: dict[str, Any] = {"model": "mlp", "inputs": [ROW]}
TRAIN: dict[str, Any] = {"model": "mlp", "data": {"inputs": [ROW], "targets": [0]}, "epochs": 1}
FIELDS = ("v", "key_id", "task", "id", "model", "requirements", "body_sha256", "issued_at", "expires_at", "nonce")
DEADLINE_S = 40.0

Message = dict[str, Any]


@dataclass
class Case:
    name: str
    error: str  # the exception class name .get() must raise ("A|B": either)
    fragment: str  # a piece of its message ("a|b": either)
    message: Message | Callable[[], Message]  # send_task keyword arguments (name, args, kwargs, task_id, headers)


@dataclass
class Keys:
    scheduler: nacl.signing.SigningKey
    stranger: nacl.signing.SigningKey


def worker_config(key: nacl.signing.SigningKey) -> dict[str, Any]:
    return {
        "security": {
            "verify_task_signatures": True,
            "allowed_schedulers": [peer_id(key.verify_key)],
            "max_input_bytes": "64KiB",
        },
        "resources": {"node_id": NODE},
    }


def resign(key: nacl.signing.SigningKey, env: dict[str, Any]) -> dict[str, Any]:
    unsigned = {name: env[name] for name in FIELDS}
    return {**unsigned, "signature": base64.b64encode(key.sign(canonical(unsigned)).signature).decode()}


def signed(key: nacl.signing.SigningKey, kwargs: Any, *, task: str = "hypha.infer", args: list[Any] | None = None) -> Message:
    """A validly signed message (its content may still be bad)."""
    args = args or []
    options = signed_options(key, task, args=args, kwargs=kwargs)
    return {"name": task, "args": args, "kwargs": kwargs, **options}


def with_envelope(task: str, kwargs: Any, envelope: Any, task_id: str | None = None) -> Message:
    headers = {} if envelope is None else {ENVELOPE_HEADER: envelope}
    return {"name": task, "kwargs": kwargs, "task_id": task_id or str(uuid.uuid4()), "headers": headers}


def envelope_for(key: nacl.signing.SigningKey, kwargs: Any, task_id: str, task: str = "hypha.infer", **options: Any) -> Any:
    return sign_envelope(key, task_name=task, task_id=task_id, kwargs=kwargs, **options)


def encoded(rows: int, *, dtype: str = "float32", data: str | None = None, shape: Any = None, **extra: Any) -> dict[str, Any]:
    raw = struct.pack(f"<{rows * 4}f", *([1.0] * rows * 4))
    tensor = {"dtype": dtype, "shape": [rows, 4] if shape is None else shape,
              "data": base64.b64encode(raw).decode() if data is None else data}
    return {**tensor, **extra}


def nested(depth: int) -> Any:
    value: Any = 1.0
    for _ in range(depth):
        value = [value]
    return value


def infer(**kwargs: Any) -> dict[str, Any]:
    return {**VALID, **kwargs}


def with_req(**requirements: Any) -> dict[str, Any]:
    return {**VALID, "requirements": requirements}


def signature_cases(k: Keys, send_valid: Callable[[Message], Any]) -> list[Case]:
    key = k.scheduler

    def forged() -> Message:
        message = signed(key, VALID)
        env = dict(message["headers"][ENVELOPE_HEADER])
        raw = bytearray(base64.b64decode(env["signature"]))
        raw[7] ^= 0x40
        env["signature"] = base64.b64encode(bytes(raw)).decode()
        return {**message, "headers": {ENVELOPE_HEADER: env}}

    def altered_model() -> Message:
        # the envelope's model AND the message's model changed after signing
        message = signed(key, VALID)
        env = {**message["headers"][ENVELOPE_HEADER], "model": "cnn"}
        return {**message, "kwargs": {**VALID, "model": "cnn"}, "headers": {ENVELOPE_HEADER: env}}

    def impersonated() -> Message:
        # signed by a stranger, claiming to be the allowed scheduler
        task_id = str(uuid.uuid4())
        env = {**envelope_for(k.stranger, VALID, task_id), "key_id": peer_id(key.verify_key)}
        unsigned = {name: env[name] for name in FIELDS}
        env["signature"] = base64.b64encode(k.stranger.sign(canonical(unsigned)).signature).decode()
        return with_envelope("hypha.infer", VALID, env, task_id)

    def replayed_nonce() -> Message:
        first = signed(key, VALID)
        send_valid(first)  # the original runs and succeeds
        second_id = str(uuid.uuid4())
        env = envelope_for(key, VALID, second_id)
        env["nonce"] = first["headers"][ENVELOPE_HEADER]["nonce"]
        return with_envelope("hypha.infer", VALID, resign(key, env), second_id)

    def swapped_id() -> Message:
        task_a = signed(key, VALID)
        return with_envelope("hypha.infer", VALID, task_a["headers"][ENVELOPE_HEADER])  # delivered as task B

    def swapped_model() -> Message:
        task_id = str(uuid.uuid4())
        cnn_kwargs = {"model": "cnn", "inputs": VALID["inputs"]}
        return with_envelope("hypha.infer", cnn_kwargs, envelope_for(key, VALID, task_id), task_id)

    def swapped_requirements() -> Message:
        task_id = str(uuid.uuid4())
        env = envelope_for(key, with_req(cpu_cores=0.25, memory="128MiB"), task_id)
        return with_envelope("hypha.infer", with_req(cpu_cores=2, memory="1GB"), env, task_id)

    def swapped_inputs() -> Message:
        task_id = str(uuid.uuid4())
        env = envelope_for(key, VALID, task_id)
        return with_envelope("hypha.infer", infer(inputs=[[9.0, 9.0, 9.0, 9.0]]), env, task_id)

    def swapped_task() -> Message:
        task_id = str(uuid.uuid4())
        return with_envelope("hypha.infer", VALID, envelope_for(key, VALID, task_id, task="hypha.train"), task_id)

    def extra_field() -> Message:
        task_id = str(uuid.uuid4())
        return with_envelope("hypha.infer", VALID, {**envelope_for(key, VALID, task_id), "admin": True}, task_id)

    def missing_field() -> Message:
        task_id = str(uuid.uuid4())
        env = envelope_for(key, VALID, task_id)
        del env["expires_at"]
        return with_envelope("hypha.infer", VALID, env, task_id)

    def timed(**options: Any) -> Callable[[], Message]:
        def make() -> Message:
            task_id = str(uuid.uuid4())
            return with_envelope("hypha.infer", VALID, envelope_for(key, VALID, task_id, **options), task_id)

        return make

    def stranger() -> Message:
        return signed(k.stranger, VALID)

    bad = "InvalidSignature"
    return [
        Case("unsigned", bad, "carries no signed envelope", lambda: with_envelope("hypha.infer", VALID, None)),
        Case("forged signature", bad, "bad signature", forged),
        Case("field altered after signing", bad, "bad signature", altered_model),
        Case("stranger claims the allowed key id", bad, "bad signature", impersonated),
        Case("wrong key", bad, "not in this worker's allowed_schedulers", stranger),
        Case("expired", bad, "expired", timed(now=time.time() - 1000, ttl=300)),
        Case("issued in the future", bad, "in the future", timed(now=time.time() + 3600, ttl=300)),
        Case("issued in the year 3e8", bad, "in the future|invalid", timed(now=1e16, ttl=300)),
        Case("validity past max_envelope_age", bad, "longer than this worker accepts", timed(ttl=7200)),
        Case("replayed nonce", bad, "replayed nonce", replayed_nonce),
        Case("envelope of task A on task B", bad, "signed for task id", swapped_id),
        Case("envelope model mlp, message cnn", bad, "names model 'mlp', the message 'cnn'", swapped_model),
        Case("envelope requirements differ", bad, "requirements differ", swapped_requirements),
        Case("envelope inputs differ", bad, "arguments differ", swapped_inputs),
        Case("envelope for hypha.train on hypha.infer", bad, "signed for task 'hypha.train'", swapped_task),
        Case("envelope with an extra field", bad, "malformed", extra_field),
        Case("envelope missing a field", bad, "malformed", missing_field),
        Case("envelope is a string", bad, "malformed", lambda: with_envelope("hypha.infer", VALID, "trust me")),
        Case("envelope is a list", bad, "malformed", lambda: with_envelope("hypha.infer", VALID, [1, 2, 3])),
    ]


def unsignable(key: nacl.signing.SigningKey, kwargs: dict[str, Any], task: str = "hypha.infer") -> Message:
    """A message holding an integer beyond 2**53, which has no RFC 8785 form: the envelope is signed over a
    stand-in (0 for each such integer), as a scheduler ignoring the rule might, then made to name the real fields."""
    stand_in = json.loads(json.dumps(kwargs), parse_int=lambda text: int(text) if abs(int(text)) < 2**53 else 0)
    options = signed_options(key, task, kwargs=stand_in)
    options["headers"][ENVELOPE_HEADER].update(model=kwargs.get("model"), requirements=kwargs.get("requirements"))
    return {"name": task, "args": [], "kwargs": kwargs, **options}


def validation_cases(k: Keys) -> list[Case]:
    key = k.scheduler

    def s(kwargs: Any, task: str = "hypha.infer", args: list[Any] | None = None) -> Callable[[], Message]:
        return lambda: signed(key, kwargs, task=task, args=args)

    def u(kwargs: dict[str, Any]) -> Callable[[], Message]:
        return lambda: unsignable(key, kwargs)

    big_rows = MAX_INPUT_BYTES // 16 + 100  # rows of 4 float32 over the cap
    return [
        # model ids
        Case("path traversal ../etc/passwd", "UnsupportedModel", "invalid model id", s(infer(model="../etc/passwd"))),
        Case("path traversal ..", "UnsupportedModel", "invalid model id", s(infer(model=".."))),
        Case("path with a slash a/b", "UnsupportedModel", "invalid model id", s(infer(model="a/b"))),
        Case("absolute path", "UnsupportedModel", "invalid model id", s(infer(model="/etc/passwd"))),
        Case("model id with a trailing newline", "UnsupportedModel", "invalid model id", s(infer(model="mlp\n"))),
        Case("model id too long", "UnsupportedModel", "invalid model id", s(infer(model="m" * 200))),
        Case("unknown model", "UnsupportedModel", "not in this worker's store", s(infer(model="resnet9000"))),
        Case("model is an int", "UnsupportedModel", "invalid model id", s(infer(model=7))),
        Case("model is null", "UnsupportedModel", "invalid model id", s(infer(model=None))),
        # requirements
        Case("memory 100GB", "ExcessiveMemoryRequest", "max_memory_per_task", s(with_req(memory="100GB"))),
        Case("cpu_cores above the max", "InsufficientCpu", "max_cpu_cores_per_task", s(with_req(cpu_cores=64))),
        Case("negative memory", "InvalidTask", "must not be negative", s(with_req(memory=-1))),
        Case("negative memory string", "InvalidTask", "requirements.memory", s(with_req(memory="-5GB"))),
        Case("memory nonsense unit", "InvalidTask", "requirements.memory", s(with_req(memory="5 parsecs"))),
        Case("negative cpu_cores", "InvalidTask", "must be positive", s(with_req(cpu_cores=-2))),
        Case("zero cpu_cores", "InvalidTask", "must be positive", s(with_req(cpu_cores=0))),
        Case("cpu_cores 1.5", "InvalidTask", "whole cores", s(with_req(cpu_cores=1.5))),
        Case("cpu_cores a string", "InvalidTask", "must be a number", s(with_req(cpu_cores="many"))),
        Case("cpu_cores a bool", "InvalidTask", "must be a number", s(with_req(cpu_cores=True))),
        Case("unknown requirement key", "InvalidTask", "requirements.disk is not a requirement", s(with_req(disk="1GB"))),
        Case("requirements a string", "InvalidTask", "requirements must be an object", s(infer(requirements="big"))),
        Case("negative gpus", "InvalidTask", "requirements.gpus", s(with_req(gpus=-1))),
        Case("64 gpus", "InsufficientCapabilities", "can ever fit", s(with_req(gpus=64))),
        Case("cpu_cores 1e308", "InsufficientCpu|InvalidTask", "cpu_cores", s(with_req(cpu_cores=1e308))),
        # integers beyond 2**53 have no RFC 8785 canonical form: refused at the signature (the envelope names
        # them in its requirements) or at the body digest; a signer refuses them before sending
        Case("10**30 gpus", "InvalidSignature", "bad signature", u(with_req(gpus=10**30))),
        Case("cpu_cores 10**400", "InvalidSignature", "bad signature", u(with_req(cpu_cores=10**400))),
        Case("memory 10**400", "InvalidSignature", "bad signature", u(with_req(memory=10**400))),
        Case("gpu_memory 10**400", "InvalidSignature", "bad signature", u(with_req(gpu_memory=10**400))),
        Case("inputs 2**53 + 1", "InvalidSignature", "no RFC 8785 canonical form", u(infer(inputs=[[2**53 + 1, 3.4, 1.5, 0.2]]))),
        # the task's arguments
        Case("inputs a string", "InvalidInput", "inputs must be a nested list", s(infer(inputs="5.0,3.4,1.5,0.2"))),
        Case("positional args", "InvalidTask", "keyword arguments only", s({}, args=["mlp", [ROW]])),
        Case("positional and keyword args", "InvalidTask", "keyword arguments only", s(VALID, args=[1])),
        Case("unknown kwarg", "InvalidTask", "unknown argument 'temperature'", s(infer(temperature=0.7))),
        Case("missing inputs", "InvalidTask", "missing the required argument 'inputs'", s({"model": "mlp"})),
        Case("missing model", "InvalidTask", "missing the required argument 'model'", s({"inputs": [ROW]})),
        # inputs
        Case("ragged inputs", "InvalidInput", "ragged", s(infer(inputs=[ROW, [1.0, 2.0, 3.0]]))),
        Case("ragged deeper", "InvalidInput", "inputs must be numbers", s(infer(inputs=[ROW, [1.0, [2.0], 3.0, 4.0]]))),
        Case("wrong input shape", "InvalidInput", "takes [4] per sample", s(infer(inputs=[[1.0, 2.0]]))),
        Case("too many dims", "InvalidInput", "takes [4] per sample", s(infer(inputs=[[ROW]]))),
        Case("deeply nested inputs", "InvalidInput", "nested deeper than", s(infer(inputs=nested(900)))),
        Case("non-number inputs", "InvalidInput", "inputs must be numbers", s(infer(inputs=[["a", "b", "c", "d"]]))),
        Case("bool inputs", "InvalidInput", "found bool", s(infer(inputs=[[True, False, True, False]]))),
        Case("null inputs", "InvalidInput", "inputs must be numbers", s(infer(inputs=[[None, 1.0, 2.0, 3.0]]))),
        Case("empty inputs", "InvalidInput", "empty list", s(infer(inputs=[]))),
        Case("huge list inputs", "InvalidInput", "above the cap", s(infer(inputs=[ROW] * big_rows))),
        Case("huge encoded tensor", "InvalidInput", "max_input_bytes", s(infer(inputs=encoded(big_rows)))),
        Case("encoded shape lies (huge)", "InvalidInput", "max_input_bytes",
             s(infer(inputs=encoded(1, shape=[10**9, 4])))),
        Case("encoded bad base64", "InvalidInput", "not valid base64", s(infer(inputs=encoded(1, data="!!!not-base64!!!")))),
        Case("encoded wrong byte count", "InvalidInput", "needs 32", s(infer(inputs=encoded(2, data="AAAA")))),
        Case("encoded unknown dtype", "InvalidInput", "'complex128' is not one of",
             s(infer(inputs=encoded(1, dtype="complex128")))),
        Case("encoded dtype is a list", "InvalidInput", "encoded dtype", s(infer(inputs=encoded(1, dtype=["float32"])))),
        Case("encoded extra key", "InvalidInput", "needs exactly", s(infer(inputs=encoded(1, exec="rm -rf /")))),
        Case("encoded zero dim", "InvalidInput", "positive integers", s(infer(inputs=encoded(1, shape=[0, 4])))),
        Case("encoded data not a string", "InvalidInput", "base64 string", s(infer(inputs=encoded(1, data=[1, 2])))),
        Case("encoded NaN", "InvalidInput", "finite numbers",
             s(infer(inputs=encoded(1, data=base64.b64encode(struct.pack("<4f", 1.0, float("nan"), 1.0, 1.0)).decode())))),
        Case("encoded infinity", "InvalidInput", "finite numbers",
             s(infer(inputs=encoded(1, data=base64.b64encode(struct.pack("<4f", 1.0, 1.0, float("-inf"), 1.0)).decode())))),
        # hypha.train
        Case("train epochs a string", "InvalidTask", "epochs must be an integer", s({**TRAIN, "epochs": "10"}, "hypha.train")),
        Case("train lr negative", "InvalidTask", "lr must be a number in (0, 10]", s({**TRAIN, "lr": -0.1}, "hypha.train")),
        Case("train new_model traversal", "UnsupportedModel", "invalid model id",
             s({**TRAIN, "new_model": "../../tmp/evil"}, "hypha.train")),
        Case("train new_model exists", "InvalidTask", "already exists", s({**TRAIN, "new_model": "cnn"}, "hypha.train")),
        Case("train targets count", "InvalidInput", "data.targets",
             s({**TRAIN, "data": {"inputs": [ROW], "targets": [0, 1]}}, "hypha.train")),
        Case("train data without targets", "InvalidTask", "{'inputs': [...], 'targets': [...]}",
             s({**TRAIN, "data": {"inputs": [ROW]}}, "hypha.train")),
        # hypha.noop and unknown task names
        Case("noop negative hold", "InvalidTask", "hold_s must be a number", s({"hold_s": -1}, "hypha.noop")),
        Case("noop hold past task_timeout", "InvalidTask", "hold_s must be a number", s({"hold_s": 10**6}, "hypha.noop")),
        Case("unregistered task", "NotRegistered", "hypha.nosuch", s(VALID, "hypha.nosuch")),
    ]


def publish_raw(app: Any, body: bytes, *, task: str | None = "hypha.infer", content_type: str = "application/json") -> Any:
    """Put a message on the queue exactly as given: protocol v2 headers for ``task`` (if any), ``body`` as is."""
    task_id = str(uuid.uuid4())
    template = app.amqp.as_task_v2(task_id, task or "hypha.infer", args=(), kwargs={})
    headers = dict(template.headers) if task else {}
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        producer.publish(
            body,
            exchange="",
            routing_key="hypha",
            serializer=None,
            content_type=content_type,
            content_encoding="utf-8",
            headers=headers,
            **template.properties,
        )
    return app.AsyncResult(task_id)


def check(case: Case, result: Any, deadline: float) -> str | None:
    """None if ``result`` failed as ``case`` says, else what happened instead."""
    try:
        value = result.get(timeout=max(1.0, deadline - time.monotonic()), propagate=True)
    except Exception as exc:
        name = type(exc).__name__
        if name not in case.error.split("|") or not any(part in str(exc) for part in case.fragment.split("|")):
            return f"{case.name}: expected {case.error} containing {case.fragment!r}, got {name}: {str(exc)[:300]}"
        return None
    return f"{case.name}: expected {case.error}, but it SUCCEEDED: {str(value)[:200]}"


def test_bad_input_corpus_on_one_worker(start_worker, celery_client, redis_client, model_dir: Path, tmp_path: Path) -> None:
    key = generate_key(tmp_path / "scheduler.key")
    k = Keys(scheduler=key, stranger=nacl.signing.SigningKey.generate())
    worker = start_worker(worker_config(key))
    app = celery_client()
    models_before = sorted(os.listdir(model_dir))
    valid_results: list[Any] = []

    def send_valid(message: Message | None = None) -> Any:
        result = app.send_task(**(message or signed(key, VALID)))
        valid_results.append(result)
        return result.get(timeout=60)

    # warm up: the first valid task starts the executor and loads torch
    assert send_valid()["model"] == "mlp"

    corpus = [*signature_cases(k, send_valid), *validation_cases(k)]
    assert len(corpus) >= 30
    assert len({case.name for case in corpus}) == len(corpus)

    # send every case, with a valid signed task after every 8th, then collect
    sent: list[tuple[Case, Any]] = []
    for index, case in enumerate(corpus):
        message = case.message() if callable(case.message) else case.message
        sent.append((case, app.send_task(**message)))
        if index % 8 == 7:
            valid_results.append(app.send_task(**signed(key, VALID)))
    # messages kombu refuses before any task code: pickle, and bodies that are not JSON
    pickled = app.send_task(serializer="pickle", **signed(key, VALID))
    not_json = publish_raw(app, b"{not json")
    not_utf8 = publish_raw(app, b'{"\xff\xfe": 1}')
    no_headers = publish_raw(app, b"{not json either", task=None)
    # valid JSON that is no task message: refused by hypha's message strategy, before the task runs
    wrong_shape = publish_raw(app, b'{"args": 1}')
    for _ in range(5):
        valid_results.append(app.send_task(**signed(key, VALID)))

    deadline = time.monotonic() + DEADLINE_S
    failures = [problem for case, result in sent if (problem := check(case, result, deadline))]

    lost = []
    for result in valid_results:
        try:
            value = result.get(timeout=max(1.0, deadline - time.monotonic()))
            if value.get("model") != "mlp" or len(value.get("output", [])) != 1:
                lost.append(f"{result.id}: unexpected result {str(value)[:200]}")
        except Exception as exc:
            lost.append(f"{result.id}: {type(exc).__name__}: {str(exc)[:200]}")

    # the refused raw messages: never ran, the worker said why, and those with a task id failed by name
    log = wait_for(
        lambda: (text := worker.output()).count("refused a malformed message") >= 5
        and "application/x-python-serialize" in text
        and text,
        10,
        "the worker to log the refused messages",
    )
    for name, result in [("pickle", pickled), ("not json", not_json), ("not utf-8", not_utf8),
                         ("JSON of the wrong shape", wrong_shape)]:
        if result.state != "FAILURE" or type(result.result).__name__ != "MalformedMessage":
            failures.append(f"{name}: expected FAILURE with MalformedMessage, got {result.state} {result.result!r:.200}")
    if no_headers.state != "PENDING":  # no task headers: nothing names its id (the one publish_raw made up)
        failures.append(f"no task header: expected PENDING, got {no_headers.state}")
    assert "ContentDisallowed" in log

    # no bad task ran: no leases but the model cache's, no task guards, no new models
    def stray_leases() -> list[dict[str, Any]]:
        leases = Ledger(redis_client, NODE).usage().leases
        return [lease for lease in leases if not str(lease.get("id", "")).startswith("cache:")]

    # valid tasks' leases go back from the worker's keeper thread, moments after each task
    deadline = time.monotonic() + 5
    def live_guards() -> list[bytes]:  # a finished task's guard says "done" for a minute
        return [key for key in redis_client.keys(keys.task_guard("*")) if redis_client.get(key) != b"done"]

    while (stray_leases() or live_guards()) and time.monotonic() < deadline:
        time.sleep(0.05)
    stray = stray_leases()
    guards = live_guards()
    new_models = sorted(set(os.listdir(model_dir)) - set(models_before))
    unexpected = [line for line in log.splitlines() if "raised unexpected" in line or "Traceback" in line]
    assert "the body is not [args, kwargs, options]" in worker.output()

    assert worker.alive(), f"the worker died:\n{worker.output()[-3000:]}"
    report = "\n".join([
        *(f"  bad case: {f}" for f in failures),
        *(f"  valid task lost: {item}" for item in lost),
        *([f"  leases left: {stray}"] if stray else []),
        *([f"  task guards left: {guards}"] if guards else []),
        *([f"  models created: {new_models}"] if new_models else []),
        *(f"  unexpected error logged: {line[:300]}" for line in unexpected),
    ])
    assert not report, f"{len(corpus)} bad cases, {len(valid_results)} valid tasks:\n{report}"


def test_worker_keeps_serving_after_undecodable_messages(start_worker, celery_client, tmp_path: Path) -> None:
    key = generate_key(tmp_path / "scheduler.key")
    worker = start_worker(worker_config(key))
    app = celery_client()
    # Given a burst of messages whose JSON body cannot be decoded, and a pickled one
    refused = [publish_raw(app, body) for body in (b"{not json", b"[1, 2", b"\x80\x81\x82", b"\x00")]
    refused.append(app.send_task(serializer="pickle", **signed(key, VALID)))
    # ... and messages in content types this worker does not accept
    content_types = ["application/x-yaml", "application/x-msgpack", "text/plain"]
    refused += [publish_raw(app, b"[[], {}, {}]", content_type=kind) for kind in content_types]
    # When valid signed tasks follow
    results = [app.send_task(**signed(key, VALID)) for _ in range(3)]
    # Then every valid task completes, the refused ones never ran, and the worker said why
    for result in results:
        try:
            value = result.get(timeout=30)
        except Exception as exc:
            raise AssertionError(f"a valid task after the refused messages: {exc!r}\n{worker.output()[-4000:]}") from None
        assert value["model"] == "mlp"
    log = wait_for(
        lambda: (text := worker.output()).count("refused a malformed message") >= len(refused)
        and all(kind in text for kind in ["application/x-python-serialize", *content_types])
        and text,
        10,
        "the worker to log the refused messages",
    )
    assert "the body cannot be decoded" in log and "Traceback" not in log
    assert [result.state for result in refused] == ["FAILURE"] * len(refused)
    assert {type(result.result).__name__ for result in refused} == {"MalformedMessage"}
    assert worker.alive()


POISON = [
    pytest.param("application/json", b"", id="json-empty"),
    pytest.param("application/json", b"null", id="json-null"),
    pytest.param("application/json", b"1", id="json-number"),
    pytest.param("application/json", b"true", id="json-bool"),
    pytest.param("application/data", b"[[], {}, {}]", id="raw-data"),
    pytest.param("application/text", b"[[], {}, {}]", id="raw-text"),
]


@pytest.mark.parametrize(("content_type", "body"), POISON)
def test_a_body_that_is_no_task_message_does_not_kill_the_worker(
    start_worker, celery_client, tmp_path: Path, content_type: str, body: bytes
) -> None:
    key = generate_key(tmp_path / "scheduler.key")
    worker = start_worker(worker_config(key))
    app = celery_client()
    # Given a message with valid task headers whose body is no [args, kwargs, embed] list
    poison = publish_raw(app, body, content_type=content_type)
    # When a valid signed task follows
    result = app.send_task(**signed(key, VALID))
    wait_for(lambda: result.ready() or not worker.alive(), 30, "the valid task or the worker's exit")
    # Then the worker is still serving, the valid task ran, and the bad one did not
    if not worker.alive():
        log = worker.output()
        fatal = [line for line in log.splitlines() if "Unrecoverable error" in line]
        raise AssertionError(
            f"a {content_type} message with body {body!r} stopped the worker (exit {worker.process.returncode}): "
            f"{fatal}\n{log[-2000:]}"
        )
    assert result.get(timeout=5)["model"] == "mlp"
    # ... and the bad one failed by name, with one line in the log
    assert poison.state == "FAILURE" and type(poison.result).__name__ == "MalformedMessage"
    assert worker.output().count(f"[{poison.id}]") == 1


MALFORMED = [
    pytest.param("application/x-python-serialize", b"\x80\x04K\x01.", "hypha.infer", "MalformedMessage",
                 "cannot be decoded: ContentDisallowed", id="pickle"),
    pytest.param("application/json", b"{not json", "hypha.infer", "MalformedMessage", "cannot be decoded", id="not-json"),
    pytest.param("application/json", b'{"args": [], "kwargs": {}}', "hypha.infer", "MalformedMessage",
                 "not [args, kwargs, options]", id="not-a-task-body"),
    pytest.param("application/json", b"[[], [], {}]", "hypha.noop", "MalformedMessage", "not [args, kwargs, options]",
                 id="kwargs-not-an-object"),
    pytest.param("application/json", b"[[], {}, {}]", "hypha.nosuch", "NotRegistered", "hypha.nosuch",
                 id="unregistered-task"),
]


@pytest.mark.parametrize(("content_type", "body", "task", "error", "fragment"), MALFORMED)
def test_a_malformed_message_fails_its_task_id_by_name_with_one_log_line(
    start_worker, celery_client, tmp_path: Path, content_type: str, body: bytes, task: str, error: str, fragment: str
) -> None:
    key = generate_key(tmp_path / "scheduler.key")
    worker = start_worker(worker_config(key))
    app = celery_client()
    # Given a raw message with task headers (so a task id) whose body or name is no task this worker runs
    bad = publish_raw(app, body, task=task, content_type=content_type)
    # When a client waits on its id, Then it gets a final FAILURE with the named error, not PENDING for ever
    with pytest.raises(Exception) as caught:
        bad.get(timeout=30)
    assert type(caught.value).__name__ == error and fragment in str(caught.value)
    assert bad.state == "FAILURE"
    # ... the worker logged it in one line, with no traceback, and keeps serving
    log = worker.output()
    assert [line for line in log.splitlines() if bad.id in line and "refused a malformed message" in line] != []
    assert log.count(bad.id) == 1, log[-3000:]
    assert "Traceback" not in log
    assert app.send_task(**signed(key, VALID)).get(timeout=60)["model"] == "mlp"


def test_a_malformed_message_does_not_overwrite_a_finished_tasks_result(start_worker, celery_client, tmp_path: Path) -> None:
    key = generate_key(tmp_path / "scheduler.key")
    worker = start_worker(worker_config(key))
    app = celery_client()
    # Given a task that finished
    done = app.send_task(**signed(key, VALID))
    value = done.get(timeout=60)
    # When a malformed message arrives under the same task id
    template = app.amqp.as_task_v2(done.id, "hypha.infer", args=(), kwargs={})
    with app.connection_for_write() as conn:
        conn.Producer().publish(b"{not json", exchange="", routing_key="hypha", serializer=None,
                                content_type="application/json", content_encoding="utf-8",
                                headers=dict(template.headers), **template.properties)
    wait_for(lambda: any(done.id in line and "refused a malformed message" in line
                         for line in worker.output().splitlines()), 30, "the worker to refuse it")
    # Then the stored result is still the task's own
    assert app.AsyncResult(done.id).get(timeout=5) == value
