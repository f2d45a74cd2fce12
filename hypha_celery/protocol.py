"""The executor's wire protocol: typed messages that the worker and its executors both import.

One message is one JSON object on one line, tagged by ``kind``. JSON, never
pickle, both ways: a process that ran untrusted inputs must not be able to
make the worker run code by what it writes back. Both ends build and read
these classes, never dicts with string keys, so a field has one definition.

    worker -> executor   Infer | Generate | Train | Load | Describe
    executor -> worker   Ready (once, when it is up), then per request:
                         Progress (Train) or Streamed (Generate), any number,
                         then InferResult | GenerateResult | TrainResult |
                         Loaded | Description, or Error; Fatal when the memory
                         watchdog fired (the executor exits after it).

Shutdown is the worker closing its end of the socket: the executor reads EOF
and exits. The executor's settings travel once, as JSON in the environment
variable :data:`SETTINGS_ENV` (:class:`ChildSettings`), the socket as the file
descriptor in :data:`FD_ENV`. This module imports nothing heavy: the worker
(no torch) and the executor (no Celery) both load it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self, TypeVar

__all__ = [
    "FD_ENV",
    "SETTINGS_ENV",
    "ChildSettings",
    "Describe",
    "Description",
    "Error",
    "Fatal",
    "Generate",
    "GenerateResult",
    "Generated",
    "Infer",
    "InferResult",
    "JobLimits",
    "Load",
    "Loaded",
    "Progress",
    "Prompt",
    "ProtocolError",
    "Ready",
    "Reply",
    "Request",
    "Streamed",
    "Train",
    "TrainResult",
    "Trained",
    "Usage",
    "decode_reply",
    "decode_request",
]

SETTINGS_ENV = "HYPHA_EXECUTOR"
FD_ENV = "HYPHA_EXECUTOR_FD"


class ProtocolError(ValueError):
    """A line that is not a message of this protocol: a bug, or an executor that misbehaves."""


class _Record:
    """A dataclass that travels as a JSON object; nested records override ``from_json``/``to_json``."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, data: Any) -> Self:
        """Build from a decoded object; unknown keys are ignored, a missing one is a ``TypeError``."""
        return cls(**_known(cls, data))


def _plain(value: Any) -> Any:
    return value.to_json() if isinstance(value, _Record) else value


def _known(cls: type[_Record], data: Any) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__} must be an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return {key: value for key, value in data.items() if key in names}


class _Message(_Record):
    kind: ClassVar[str]

    def encode(self) -> bytes:
        """One line of the protocol."""
        return (json.dumps({"kind": self.kind, **self.to_json()}, separators=(",", ":")) + "\n").encode()


# --- settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildSettings(_Record):
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


# --- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobLimits(_Record):
    """What the job's leases reserved; ``None``: not enforced."""

    memory: int | None = None
    cores: list[int] | None = None
    gpu_memory: int | None = None
    threads: int | None = None  # torch threads: the cores' worth reserved (a fraction: 1), else len(cores)


class _JobRequest(_Message):
    """A request that runs under the job's limits (a nested :class:`JobLimits`)."""

    limits: JobLimits

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = _known(cls, data)
        return cls(**{**known, "limits": JobLimits.from_json(known.get("limits", {}))})


@dataclass(frozen=True)
class Infer(_JobRequest):
    """One forward pass over ``items`` (one per task of a batch), on the serving executor's cache.

    ``models``: each item's model when the batch mixes adapters of one base (and the base itself);
    ``model`` is then the first item's.
    """

    kind: ClassVar[str] = "infer"
    model: str
    items: list[Any]
    expected_size: int | None = None
    limits: JobLimits = field(default_factory=JobLimits)
    models: list[str] | None = None


@dataclass(frozen=True)
class Prompt(_Record):
    """One request's input to a generation: a ``prompt`` string or chat ``messages``."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class Generate(_JobRequest):
    """Generate text for each of ``prompts`` (one per task of a batch) with ``model``, on the serving executor's cache.

    ``params`` are validated sampling settings (:class:`~hypha_celery.stages.validation.GenerateParams`
    as JSON), the same for every prompt of a batch; the executor reports :class:`Streamed`
    (with the prompt's index) at most every ``progress_interval`` seconds.
    """

    kind: ClassVar[str] = "generate"
    model: str
    params: dict[str, Any]
    prompts: list[Prompt]
    progress_interval: float = 0.25
    expected_size: int | None = None
    limits: JobLimits = field(default_factory=JobLimits)
    models: list[str] | None = None  # each prompt's model in a batch that mixes adapters of one base, as for Infer

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "prompts": [p.to_json() for p in self.prompts]}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = _known(cls, data)
        prompts = known.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise TypeError("Generate.prompts must be a non-empty list")
        return cls(**{**known, "prompts": [Prompt.from_json(p) for p in prompts],
                      "limits": JobLimits.from_json(known.get("limits", {}))})


@dataclass(frozen=True)
class Train(_JobRequest):
    """Fine-tune ``model`` on inline ``data`` or the verified file at ``data_path``; store it as ``new_model``.

    The fields after ``task_id`` are for transformers models only (validated by
    :func:`~hypha_celery.stages.validation.validate_train`): ``method`` ``full`` or
    ``lora`` (``lora``: ``r``, ``alpha``, ``dropout``, ``target_modules``), ``merge``
    (a LoRA run stores the merged model), ``max_steps`` (optimizer steps; ``epochs``
    when None), ``grad_accum``, ``warmup_steps``, ``seed``, ``max_length`` (tokens),
    ``checkpoint_every`` (optimizer steps between checkpoints under the task id; None: none).
    """

    kind: ClassVar[str] = "train"
    model: str
    new_model: str
    epochs: int
    lr: float
    batch_size: int
    data: dict[str, Any] | None = None
    data_path: str | None = None
    progress_interval: float = 0.25
    limits: JobLimits = field(default_factory=JobLimits)
    task_id: str | None = None  # recorded with the new model, so a copy of the task can tell its own model
    method: str = "full"
    lora: dict[str, Any] | None = None
    merge: bool = False
    max_steps: int | None = None
    grad_accum: int = 1
    warmup_steps: int = 0
    seed: int = 0
    max_length: int | None = None
    checkpoint_every: int | None = None


@dataclass(frozen=True)
class Load(_Message):
    """Load ``model`` into the serving executor's cache with no request waiting: ``[worker.models] preload``."""

    kind: ClassVar[str] = "load"
    model: str
    expected_size: int | None = None


@dataclass(frozen=True)
class Describe(_Message):
    """Ask what the executor is allowed (its sandbox, its cache)."""

    kind: ClassVar[str] = "describe"


Request = Infer | Generate | Train | Load | Describe


# --- replies ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready(_Message):
    kind: ClassVar[str] = "ready"
    pid: int


@dataclass(frozen=True)
class Progress(_Message):
    """A training step report, at most every ``Train.progress_interval`` seconds.

    ``tokens_per_s`` and ``eta_s`` (seconds left at the rate so far): transformers training only.
    ``checkpoint_step``: a checkpoint was written at that step since the last report (the worker
    copies it to shared storage, :mod:`hypha_celery.models.checkpoint_sync`).
    """

    kind: ClassVar[str] = "progress"
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    percent: float
    tokens_per_s: float | None = None
    eta_s: float | None = None
    checkpoint_step: int | None = None


@dataclass(frozen=True)
class Streamed(_Message):
    """The text generated so far for prompt ``index`` of the batch (cumulative, held back before a
    possible stop string) and its token count.

    ``ids``: the token ids generated since the row's previous report, the first of them the row's
    token number ``start`` (so the reports of a row, joined, are its token ids: the record a token
    stream keeps, :mod:`hypha_celery.token_stream`); ``at``: the executor's wall clock when the newest came.
    """

    kind: ClassVar[str] = "streamed"
    text: str
    tokens: int
    index: int = 0
    ids: list[int] = field(default_factory=list)
    start: int = 0
    at: float = 0.0


@dataclass(frozen=True)
class Error(_Message):
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
class Usage(_Record):
    """What a job used, measured in the executor."""

    memory_peak: int
    device: str
    cpu_affinity: list[int]
    gpu_memory_peak: int | None = None


@dataclass(frozen=True)
class InferResult(_Message):
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
        known = _known(cls, data)
        return cls(**{
            **known,
            "errors": [None if e is None else Error.from_json(e) for e in known.get("errors", ())],
            "usage": Usage.from_json(known.get("usage")),
        })


@dataclass(frozen=True)
class Generated(_Record):
    """What one prompt of a generation produced."""

    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    completion_tokens: int
    proof: dict[str, Any] | None = None  # with ``params["proof"]``: :class:`~hypha_celery.models.proofs.Proof` JSON


@dataclass(frozen=True)
class GenerateResult(_Message):
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

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "outputs": [None if o is None else o.to_json() for o in self.outputs],
                "errors": [None if e is None else e.to_json() for e in self.errors]}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = _known(cls, data)
        return cls(**{
            **known,
            "outputs": [None if o is None else Generated.from_json(o) for o in known.get("outputs", ())],
            "errors": [None if e is None else Error.from_json(e) for e in known.get("errors", ())],
            "usage": Usage.from_json(known.get("usage")),
        })


@dataclass(frozen=True)
class Trained(_Record):
    """What training did; the client gets it with the new model's id."""

    final_loss: float
    loss_curve: list[float]
    epochs: int
    steps: int
    samples: int
    # transformers training: tokens the model was trained on (padding not counted), and what it measured
    trained_tokens: int | None = None
    metrics: dict[str, Any] | None = None
    # with checkpoint_every: the step a checkpoint of this task resumed the run at (0: from the start), and why
    # a checkpoint found at start was refused (another model sha256, other data or settings, unreadable)
    resumed_from_step: int = 0
    checkpoint_refused: str | None = None


@dataclass(frozen=True)
class TrainResult(_Message):
    kind: ClassVar[str] = "train_result"
    model_id: str
    trained: Trained
    load_s: float
    usage: Usage

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = _known(cls, data)
        return cls(**{**known, "trained": Trained.from_json(known.get("trained")), "usage": Usage.from_json(known.get("usage"))})


@dataclass(frozen=True)
class Loaded(_Message):
    """A :class:`Load` done: how long it took, and the cache's bytes per model after it."""

    kind: ClassVar[str] = "loaded"
    cache_hit: bool
    load_s: float
    cache: dict[str, int]


@dataclass(frozen=True)
class Description(_Message):
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


Reply = Ready | Progress | Streamed | Error | Fatal | InferResult | GenerateResult | TrainResult | Loaded | Description

_M = TypeVar("_M", bound=_Message)
_REQUESTS: dict[str, type[Request]] = {cls.kind: cls for cls in (Infer, Generate, Train, Load, Describe)}
_REPLIES: dict[str, type[Reply]] = {
    cls.kind: cls
    for cls in (Ready, Progress, Streamed, Error, Fatal, InferResult, GenerateResult, TrainResult, Loaded, Description)
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
