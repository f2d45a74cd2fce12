"""The executor's wire protocol: typed messages that the worker and its executors both import.

One message is one JSON object on one line, tagged by ``kind``. The jobs'
requests (Infer, Generate, Train) and the reports a runtime makes (Progress,
Streamed) are the work's own types, in :mod:`hypha_celery.work`, which the
runtimes share; this module adds the executor's own messages and reads a line
back into the message it is. JSON, never
pickle, both ways: a process that ran untrusted inputs must not be able to
make the worker run code by what it writes back. Both ends build and read
these classes, never dicts with string keys, so a field has one definition.

    worker -> executor   Infer | Generate | Train | OuterStep | Load | Describe
                         | Submit (a generation for the continuous batch) | Cancel
    executor -> worker   Ready (once, when it is up), then per request:
                         Progress (Train) or Streamed (Generate), any number,
                         then InferResult | GenerateResult | TrainResult | Stepped |
                         Loaded | Description, or Error; Fatal when the memory
                         watchdog fired (the executor exits after it).
                         A Submit's Streamed, GenerateResult or Error come
                         wrapped in Tagged (its id), interleaved with the others.

Untagged requests are answered one at a time, in order; any number of Submits may be
in flight beside them (the executor's serving loop, :mod:`hypha_celery.executor.serving`).

Shutdown is the worker closing its end of the socket: the executor reads EOF
and exits. The executor's settings travel once, as JSON in the environment
variable :data:`SETTINGS_ENV` (:class:`ChildSettings`), the socket as the file
descriptor in :data:`FD_ENV`. This module imports nothing heavy (only
:mod:`hypha_celery.work`): the worker (no torch) and the executor (no Celery) both load it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar

from hypha_celery.work import (
    Generate,
    Generated,
    Infer,
    Message,
    OuterStep,
    Progress,
    Record,
    Streamed,
    Train,
    Trained,
    known_fields,
)

__all__ = [
    "FD_ENV",
    "SETTINGS_ENV",
    "Cancel",
    "ChildSettings",
    "Describe",
    "Description",
    "Error",
    "Fatal",
    "GenerateResult",
    "InferResult",
    "Load",
    "Loaded",
    "ProtocolError",
    "Ready",
    "Reply",
    "Request",
    "Stepped",
    "Submit",
    "Tagged",
    "TaggedReply",
    "TrainResult",
    "Usage",
    "decode_reply",
    "decode_request",
]

SETTINGS_ENV = "HYPHA_EXECUTOR"
FD_ENV = "HYPHA_EXECUTOR_FD"


class ProtocolError(ValueError):
    """A line that is not a message of this protocol: a bug, or an executor that misbehaves."""


# --- settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildSettings(Record):
    """What one executor process is started with."""

    store: str
    cache_size: int
    max_model_size: int
    device: str  # "cpu" or "cuda:0" (CUDA_VISIBLE_DEVICES names the physical device)
    sandbox: bool
    nice: int
    memory_mode: str  # "rlimit", "watchdog" or "off"
    tmpdir: str
    trains: bool = False  # a job executor: with the sandbox, it may also stage new models in the store
    max_text_bytes: int | None = None  # [worker.security] max_text_bytes; None: "auto", from each model's length
    max_rows: int = 32  # rows one continuous batch decodes together ([worker.batching] max_batch_size)
    prefix_cache_bytes: int = 0  # prompt-prefix KV each engine keeps ([worker.generation] prefix_cache); 0: none
    step_delay_s: float = 0.0  # a test hook: a sleep after each continuous-batching step (DECODE_DELAY_ENV)


# --- the executor's own requests ----------------------------------------------------------------


@dataclass(frozen=True)
class Load(Message):
    """Load ``model`` into the serving executor's cache with no request waiting: ``[worker.models] preload``."""

    kind: ClassVar[str] = "load"
    model: str
    expected_size: int | None = None


@dataclass(frozen=True)
class Describe(Message):
    """Ask what the executor is allowed (its sandbox, its cache)."""

    kind: ClassVar[str] = "describe"


@dataclass(frozen=True)
class Submit(Message):
    """A one-prompt generation for the serving loop's running batch; its replies come back as :class:`Tagged` ``id``."""

    kind: ClassVar[str] = "submit"
    id: int
    job: Generate

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "job": self.job.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = known_fields(cls, data)
        if not isinstance(known.get("id"), int):
            raise TypeError("Submit.id must be an integer")
        return cls(id=known["id"], job=Generate.from_json(known.get("job")))


@dataclass(frozen=True)
class Cancel(Message):
    """End the submitted generation ``id`` at the next step (a revoked task, a deadline); no reply is owed."""

    kind: ClassVar[str] = "cancel"
    id: int


Request = Infer | Generate | Train | OuterStep | Load | Describe | Submit | Cancel


# --- replies ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready(Message):
    kind: ClassVar[str] = "ready"
    pid: int


@dataclass(frozen=True)
class Error(Message):
    """A request failed: ``type`` names a class of :mod:`hypha_celery.errors`.

    ``traceback`` is the executor's, for an exception that is not a hypha error
    (the task's ML code raised): the worker logs it and chains it to the error it raises.
    """

    kind: ClassVar[str] = "error"
    type: str
    message: str
    traceback: str | None = None


@dataclass(frozen=True)
class Fatal(Error):
    """The memory watchdog fired: the executor exits right after this message."""

    kind: ClassVar[str] = "fatal"


@dataclass(frozen=True)
class Usage(Record):
    """What a job used, measured in the executor."""

    memory_peak: int
    device: str
    cpu_affinity: list[int]
    gpu_memory_peak: int | None = None


@dataclass(frozen=True)
class InferResult(Message):
    """``outputs[i]`` and ``errors[i]`` answer ``items[i]``; ``cache`` is the cache's bytes per model after the job."""

    kind: ClassVar[str] = "infer_result"
    outputs: list[Any]
    errors: list[Error | None]
    cache_hit: bool
    load_s: float
    compute_s: float
    batch_size: int
    cache: dict[str, int]
    usage: Usage

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "errors": [None if e is None else e.to_json() for e in self.errors]}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = known_fields(cls, data)
        return cls(**{
            **known,
            "errors": [None if e is None else Error.from_json(e) for e in known.get("errors", ())],
            "usage": Usage.from_json(known.get("usage")),
        })


@dataclass(frozen=True)
class GenerateResult(Message):
    """``outputs[i]`` and ``errors[i]`` answer ``prompts[i]``; ``cache`` is the cache's bytes per model after the job."""

    kind: ClassVar[str] = "generate_result"
    outputs: list[Generated | None]
    errors: list[Error | None]
    time_to_first_token_s: float
    compute_s: float
    cache_hit: bool
    load_s: float
    cache: dict[str, int]
    usage: Usage
    dtype: str | None = None  # the loaded model's parameter dtype ("bfloat16" on CUDA, "float32" on CPU)
    batch_size: int | None = None  # a submitted row: the most rows that decoded with it; None: len(prompts)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "outputs": [None if o is None else o.to_json() for o in self.outputs],
                "errors": [None if e is None else e.to_json() for e in self.errors]}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = known_fields(cls, data)
        return cls(**{
            **known,
            "outputs": [None if o is None else Generated.from_json(o) for o in known.get("outputs", ())],
            "errors": [None if e is None else Error.from_json(e) for e in known.get("errors", ())],
            "usage": Usage.from_json(known.get("usage")),
        })


@dataclass(frozen=True)
class TrainResult(Message):
    kind: ClassVar[str] = "train_result"
    model_id: str
    trained: Trained
    load_s: float
    usage: Usage

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = known_fields(cls, data)
        return cls(**{**known, "trained": Trained.from_json(known.get("trained")), "usage": Usage.from_json(known.get("usage"))})


@dataclass(frozen=True)
class Stepped(Message):
    """An :class:`~hypha_celery.work.OuterStep` done: which deltas it applied (indices into its ``deltas``, with their
    norms), which it refused and why, the norms it bounded them by, the new entry's manifest sha256 (None when
    ``publish`` was off) and the momentum files it wrote into ``scratch`` (base weight file -> path)."""

    kind: ClassVar[str] = "stepped"
    accepted: list[int]
    norms: list[float]
    refused: list[dict[str, Any]]
    median_norm: float | None
    base_norm: float
    sha256: str | None
    momentum: dict[str, str]
    usage: Usage

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = known_fields(cls, data)
        return cls(**{**known, "usage": Usage.from_json(known.get("usage"))})


@dataclass(frozen=True)
class Loaded(Message):
    """A :class:`Load` done: how long it took, and the cache's bytes per model after it."""

    kind: ClassVar[str] = "loaded"
    cache_hit: bool
    load_s: float
    cache: dict[str, int]


@dataclass(frozen=True)
class Description(Message):
    """What the executor is allowed: for operators and tests of the sandbox."""

    kind: ClassVar[str] = "description"
    pid: int
    cache: dict[str, int]
    net_namespace: str
    interfaces: list[str]
    nice: int
    tmpdir: str | None
    cwd: str
    cuda_visible_devices: str | None
    environment: list[str]
    memory_mode: str


TaggedReply = Streamed | GenerateResult | Error


@dataclass(frozen=True)
class Tagged(Message):
    """A reply to the :class:`Submit` ``id``: its Streamed reports, then its GenerateResult or Error."""

    kind: ClassVar[str] = "tagged"
    id: int
    reply: TaggedReply

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "reply": {"kind": self.reply.kind, **self.reply.to_json()}}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = known_fields(cls, data)
        inner = known.get("reply")
        kind = inner.get("kind") if isinstance(inner, dict) else None
        reply_cls = {c.kind: c for c in (Streamed, GenerateResult, Error)}.get(kind) if isinstance(kind, str) else None
        if reply_cls is None or not isinstance(known.get("id"), int):
            raise TypeError("Tagged needs an integer id and a streamed, generate_result or error reply")
        return cls(id=known["id"], reply=reply_cls.from_json(inner))


Reply = (Ready | Progress | Streamed | Error | Fatal | InferResult | GenerateResult | TrainResult | Stepped | Loaded
         | Description | Tagged)

_M = TypeVar("_M", bound=Message)
_REQUESTS: dict[str, type[Request]] = {cls.kind: cls for cls in (Infer, Generate, Train, OuterStep, Load, Describe, Submit,
                                                                  Cancel)}
_REPLIES: dict[str, type[Reply]] = {
    cls.kind: cls
    for cls in (Ready, Progress, Streamed, Error, Fatal, InferResult, GenerateResult, TrainResult, Stepped, Loaded,
                Description, Tagged)
}


def _decode(line: bytes, kinds: Mapping[str, type[_M]]) -> _M:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not JSON ({exc}): {line[:80]!r}") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    cls = kinds.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"not a message this end reads: {line[:80]!r}")
    try:
        return cls.from_json(data)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {kind} message: {exc}") from None


def decode_request(line: bytes) -> Request:
    """What the executor reads; ``ProtocolError`` if the line is not a request."""
    return _decode(line, _REQUESTS)


def decode_reply(line: bytes) -> Reply:
    """What the worker reads; ``ProtocolError`` if the line is not a reply."""
    return _decode(line, _REPLIES)
