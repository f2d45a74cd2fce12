"""One convention for Redis keys: keys.py names every key, the Lua scripts name what they receive.

Each script's header binds ``KEYS[i]`` / ``ARGV[i]`` to an upper-case local; these
tests read the headers and check that what Python sends at each position is the
key the script's header names there, and that nothing else is ever written.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import fakeredis
import nacl.signing
import pytest
import redis

from hypha_celery import keys, lua, registry
from hypha_celery.errors import RegistryUnavailable
from hypha_celery.keys import KeySchema
from hypha_celery.redis_errors import redis_errors
from hypha_celery.resources.capabilities import WorkerCapabilities
from hypha_celery.resources.ledger import Capacity, Lease, Ledger
from hypha_celery.resources.placement import Placement
from hypha_celery.resources.requirements import Requirements
from hypha_celery.security import Verifier, peer_id, sign_envelope

SCRIPTS = sorted(path.name for path in resources.files("hypha_celery").joinpath("lua").iterdir()
                 if path.name.endswith(".lua"))
BINDING = re.compile(r"^local ([A-Z][A-Z0-9_]*) = (?:.*?\b(KEYS|ARGV)\[(\d+)\]|\{?(?:tail|unpack)\((KEYS|ARGV), (\d+)\)\}?)")
NODE, TASK, WORKER = "node-1", "task-1", "celery@host"
META = f"celery-task-meta-{TASK}"  # Celery's result key, which the result backend's state script writes


def _lines(name: str) -> list[str]:
    return resources.files("hypha_celery").joinpath("lua", name).read_text().splitlines()


def _key_bindings(text: str) -> dict[int, str]:
    """Position in ``KEYS`` -> the local it is bound to (a ``tail`` binding under its first position)."""
    found: dict[int, str] = {}
    for line in text.splitlines():
        match = BINDING.match(line)
        if match and "KEYS" in (match[2], match[4]):
            found[int(match[3] or match[5])] = match[1]
    return found


def _roles(schema: KeySchema) -> dict[str, str]:
    """What each upper-case local must hold, from keys.py."""
    return {
        **{name.upper(): key for name, key in schema.ledger(NODE).items()},
        **{name.upper(): key for name, key in schema.placement().items()},
        "GUARD": schema.task_guard(TASK),
        "WORKER": schema.worker(WORKER),
        "WORKERS": schema.workers(),
        "META": META,
    }


def _caps() -> WorkerCapabilities:
    return WorkerCapabilities(cpu_cores=1, total_memory=2**30, available_memory=2**30, gpus=[], models=[],
                              max_concurrent_tasks=1)


def _touch_everything(client: redis.Redis, schema: KeySchema) -> None:
    """Every write path: ledger scripts, placement, registry, inference times, envelope nonce."""
    ledger = Ledger(client, NODE, ttl=60, schema=schema)
    ledger.set_capacity(Capacity(cores=[0, 1], memory=2**30, gpus={0: 10**9}))
    lease = ledger.reserve(Requirements(memory=2**20, cpu_milli=500), holder="h", task_id=TASK)
    assert isinstance(lease, Lease)
    ledger.account("cache:1", memory=2**20, holder="cache")
    ledger.renew([lease])
    ledger.retake([lease])
    ledger.usage()
    record = registry.WorkerRecord(worker_id=WORKER, node_id=NODE, queue=keys.worker_queue(WORKER),
                                   max_memory_per_task=2**30, max_cpu_cores_per_task=1, gpu_sharing=False,
                                   verify_task_signatures=True, started_at=time.time())
    registry.register(client, record, _caps(), ledger.usage(), ttl=60, schema=schema)
    assert Placement(client, schema=schema).choose(Requirements(memory=2**20)) is not None
    assert Placement(client, schema=schema).choose(Requirements(memory=2**20), model="m") is not None
    times = registry.InferenceTimes(schema=schema)
    times.observe("mlp", 0.5)
    times.flush(client, WORKER)
    ledger.release(lease)
    lua.script("store_state")(client, [META], ['{"status": "STARTED"}', 0])
    signer = nacl.signing.SigningKey.generate()
    envelope = sign_envelope(signer, task_name="hypha.noop", task_id=TASK)
    Verifier([peer_id(signer.verify_key)], client, schema=schema).verify(
        envelope, task_name="hypha.noop", task_id=TASK, args=(), kwargs={})


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[lua.Script, list[str]]]]:
    """Every script run, with the KEYS Python sent it."""
    calls: list[tuple[lua.Script, list[str]]] = []
    run = lua.Script.__call__

    def recording(self: lua.Script, client: redis.Redis, script_keys: Sequence[str], args: Sequence[Any]) -> Any:
        calls.append((self, list(script_keys)))
        return run(self, client, script_keys, args)

    monkeypatch.setattr(lua.Script, "__call__", recording)
    yield calls


@pytest.mark.parametrize("name", SCRIPTS)
def test_keys_and_argv_appear_only_in_the_header(name: str) -> None:
    # Given a script: its header is the leading comments and upper-case bindings
    lines = _lines(name)
    end = next(i for i, line in enumerate(lines) if not (line.startswith("--") or BINDING.match(line)))
    # Then below the header, no KEYS or ARGV is read by position
    below = [line.split("--")[0] for line in lines[end:]]
    assert [line for line in below if re.search(r"\b(KEYS|ARGV)\b", line)] == []
    # ... and the header says what the script receives in each
    assert any(line.startswith("-- KEYS") for line in lines[:end]) and any(line.startswith("-- ARGV") for line in lines[:end])


def test_every_key_python_sends_is_the_one_the_script_names(sent: list[tuple[lua.Script, list[str]]]) -> None:
    # Given every script run once with a prefix of its own
    schema = KeySchema("{t}")
    _touch_everything(fakeredis.FakeRedis(), schema)
    roles = _roles(schema)
    assert {script.name for script, _ in sent} == {name.removesuffix(".lua") for name in SCRIPTS} - {"prelude"}
    for script, sent_keys in sent:
        bindings = _key_bindings(script.text)
        # Then the key at each position the header names is keys.py's key of that name
        for position, local in bindings.items():
            if local == "GUARDS":  # a tail: one task guard per lease, from that position on
                assert sent_keys[position - 1:] == [schema.task_guard(TASK)] * len(sent_keys[position - 1:])
            elif local == "HOLDERS":  # a tail: the model's holders, by tier
                assert sent_keys[position - 1:] in ([], [schema.model_workers("m", tier) for tier in ("loaded", "stored")])
            else:
                assert sent_keys[position - 1] == roles[local], f"{script.name}: KEYS[{position}] is {local}"
        # ... and no key is sent that the header does not name
        tail = any(local in ("GUARDS", "HOLDERS") for local in bindings.values())
        assert tail or len(sent_keys) == len(bindings), script.name


def test_only_keys_py_names_are_ever_written() -> None:
    # Given a Redis used by every write path under the prefix "{t}"
    client = fakeredis.FakeRedis()
    schema = KeySchema("{t}")
    _touch_everything(client, schema)
    # Then every key in it is one keys.py names (the Lua built none of its own)
    named = {
        *schema.ledger(NODE).values(), *schema.placement().values(), schema.task_guard(TASK),
        schema.worker(WORKER), schema.workers(), schema.node_workers(NODE), META,
    }
    written = {key.decode() for key in client.keys("*")}
    nonces = {key for key in written if key.startswith(schema.nonce("", "")[: -1])}
    assert len(nonces) == 1
    assert written - nonces == named


def test_the_prefix_is_read_when_a_ledger_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given $HYPHA_KEY_PREFIX set after hypha_celery.keys was imported
    monkeypatch.setenv(keys.PREFIX_VARIABLE, "{cluster}")
    client = fakeredis.FakeRedis()
    # When a ledger is built and used
    Ledger(client, NODE).set_capacity(Capacity(cores=[0], memory=2**20))
    # Then its keys carry that prefix, and so do keys.py's module-level names
    assert {key.decode().split(":")[0] for key in client.keys("*")} == {"{cluster}"}
    assert keys.worker(WORKER) == "{cluster}:worker:celery@host"


def test_without_the_variable_the_prefix_is_hypha(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given no $HYPHA_KEY_PREFIX, Then the documented names are used
    monkeypatch.delenv(keys.PREFIX_VARIABLE, raising=False)
    assert keys.workers() == "hypha:workers"
    assert keys.node_workers(NODE) == "hypha:node:node-1:workers"
    assert keys.index_free()["gpu_memory"] == "hypha:index:free_gpu_memory"


def test_a_script_is_loaded_again_into_a_server_that_lost_it() -> None:
    # Given a ledger that has run its scripts, and a Redis that then forgot them (restart, SCRIPT FLUSH)
    client = fakeredis.FakeRedis()
    ledger = Ledger(client, NODE, ttl=60)
    ledger.set_capacity(Capacity(cores=[0], memory=2**20))
    client.script_flush()
    # When it runs one again, Then it still works
    assert ledger.usage().capacity == Capacity(cores=[0], memory=2**20)


def test_script_sources_are_read_once_per_process() -> None:
    # Given two ledgers, Then they run the very same script object (read and hashed once)
    assert lua.script("reserve", prelude=True) is lua.script("reserve", prelude=True)
    assert lua.script("reserve", prelude=True).text.startswith(lua.source("prelude"))


def test_a_connection_error_becomes_registry_unavailable() -> None:
    # When redis-py cannot connect inside redis_errors, Then hypha's error says what was being done
    with pytest.raises(RegistryUnavailable, match=r"^ledger Redis unreachable: refused$"):
        with redis_errors("ledger Redis unreachable"):
            raise redis.ConnectionError("refused")


def test_a_timeout_becomes_registry_unavailable_as_a_decorator_too() -> None:
    # Given a function wrapped by redis_errors
    @redis_errors("registry Redis unreachable")
    def slow() -> None:
        raise redis.TimeoutError("timed out")

    # Then a timeout in it is RegistryUnavailable
    with pytest.raises(RegistryUnavailable, match="timed out"):
        slow()


def test_other_redis_errors_pass_through() -> None:
    # When Redis answers with an error (a bug or a refusal, not an outage), Then it is not hidden
    with pytest.raises(redis.ResponseError), redis_errors("ledger Redis unreachable"):
        raise redis.ResponseError("WRONGTYPE")
