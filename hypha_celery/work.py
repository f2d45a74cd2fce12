r"""The work an executor's runtimes do, as types: what a job asks, what it reports, what it returns.

Neutral ground between the parts that share these types: the runtimes
(:mod:`hypha_celery.runtimes`) take the requests and return the results, the
executor protocol (:mod:`hypha_celery.protocol`) carries them between the
worker and its executors, and the tasks build and read them. It imports
nothing of ours, so none of those imports another just to share a type (the
shape of vLLM's ``v1/engine/__init__.py``: the structs that cross a process
boundary, apart from the code on either side).

Every type is a frozen dataclass with a JSON form (:class:`Record`); the ones
that travel alone on the executor's socket (the three jobs' requests, and
:class:`Progress` and :class:`Streamed` reports) are :class:`Message`\ s, one JSON
object tagged by ``kind`` on one line. Which messages an end reads, and the
executor's own messages (settings, results with usage, errors), are the
protocol's. This module imports nothing heavy: the worker (no torch) and the
executor (no Celery) both load it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

__all__ = [
    "Generate",
    "Generated",
    "Generation",
    "Infer",
    "JobLimits",
    "Message",
    "OuterStep",
    "Progress",
    "Prompt",
    "Record",
    "Streamed",
    "Train",
    "Trained",
    "known_fields",
]


class Record:
    """A dataclass that travels as a JSON object; nested records override ``from_json``/``to_json``."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, data: Any) -> Self:
        """Build from a decoded object; unknown keys are ignored, a missing one is a ``TypeError``."""
        return cls(**known_fields(cls, data))


def _plain(value: Any) -> Any:
    return value.to_json() if isinstance(value, Record) else value


def known_fields(cls: type[Record], data: Any) -> dict[str, Any]:
    """``data``'s keys that name a field of ``cls`` (a nested record's ``from_json`` starts here)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__} must be an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return {key: value for key, value in data.items() if key in names}


class Message(Record):
    """A record that travels alone on a socket: one JSON object on one line, tagged by its ``kind``."""

    kind: ClassVar[str]

    def encode(self) -> bytes:
        """One line: the JSON object with its ``kind``."""
        return (json.dumps({"kind": self.kind, **self.to_json()}, separators=(",", ":")) + "\n").encode()


# --- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobLimits(Record):
    """What the job's leases reserved; ``None``: not enforced."""

    memory: int | None = None
    cores: list[int] | None = None
    gpu_memory: int | None = None
    threads: int | None = None  # torch threads: the cores' worth reserved (a fraction: 1), else len(cores)


class _JobRequest(Message):
    """A request that runs under the job's limits (a nested :class:`JobLimits`)."""

    limits: JobLimits

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = known_fields(cls, data)
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
class Prompt(Record):
    """One request's input to a generation: a ``prompt`` string or chat ``messages``.

    ``response_format``: the checked OpenAI-shaped format its output is constrained to (None: plain text); per
    prompt, so requests with different schemas still share a batch (each row has its own constraint).
    ``resume``: the completion token ids an earlier run of the task produced (read back from its token
    stream, :mod:`hypha_celery.token_stream`): the generation continues after them; ``rng``: the row's
    random generator state after the last of them (:func:`hypha_celery.serving.sampling.rng_record`).
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    response_format: dict[str, Any] | None = None
    resume: list[int] | None = None
    rng: str | None = None


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
    step_delay_s: float = 0.0  # a test hook: a sleep after each decode step (the executor sets it, a slow machine)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "prompts": [p.to_json() for p in self.prompts]}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        known = known_fields(cls, data)
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
    max_seconds: float | None = None  # a DiLoCo time box: no step starts that would end past it (at least one runs)
    step_delay_s: float = 0.0  # a test hook: a sleep after each step (a slow machine on demand)
    adapter: str | None = None  # method "lora": a stored adapter of ``model`` to continue (a LoRA DiLoCo round)


@dataclass(frozen=True)
class OuterStep(_JobRequest):
    """A DiLoCo round's outer step, run in a job executor under the lease's memory cap (:mod:`hypha_celery.training.
    distributed.apply`): check the fetched deltas at ``deltas`` (``path``, ``weight``, ``what`` each; files under
    ``scratch`` the worker wrote), combine them onto ``base`` (a model, sharded or not, or a LoRA adapter) with
    Nesterov momentum, write the momentum into ``scratch`` file by file and store ``next_id`` in the base's layout.

    ``momentum_in``: the last round's momentum, one file per base weight file (None in round 1). ``expected``: the
    metadata every delta must carry. ``init_lora`` (round 0 of a LoRA job): no deltas; store a fresh adapter of
    ``base`` with these settings and ``seed`` as ``next_id`` instead.
    """

    kind: ClassVar[str] = "outer_step"
    job: str
    round: int
    base: str
    next_id: str
    scratch: str
    deltas: list[dict[str, Any]] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)
    momentum_in: dict[str, str] | None = None
    lr: float = 0.7
    momentum: float = 0.9
    aggregator: str = "mean"
    trim: float = 0.0
    max_delta_norm_ratio: float | None = None
    max_base_norm_ratio: float | None = None
    min_workers: int = 1
    publish: bool = True  # False: next_id is in the store already (a re-run): only the momentum is written
    init_lora: dict[str, Any] | None = None
    seed: int = 0
    limits: JobLimits = field(default_factory=JobLimits)


# --- reports and results --------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress(Message):
    """A training step report, at most every ``Train.progress_interval`` seconds.

    ``tokens_per_s`` and ``eta_s`` (seconds left at the rate so far): transformers training only.
    ``checkpoint_step``: a checkpoint was written at that step since the last report (the worker
    copies it to shared storage, :mod:`hypha_celery.training.checkpoints.sync`).
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
class Streamed(Message):
    """The text generated so far for prompt ``index`` of the batch (cumulative, held back before a
    possible stop string) and its token count.

    ``ids``: the token ids generated since the row's previous report, the first of them the row's
    token number ``start`` (so the reports of a row, joined, are its token ids: the record a token
    stream keeps, :mod:`hypha_celery.token_stream`); ``at``: the executor's wall clock when the newest came;
    ``rng``: a seeded sampled row's generator state after its newest token (what continuing it elsewhere needs).
    """

    kind: ClassVar[str] = "streamed"
    text: str
    tokens: int
    index: int = 0
    ids: list[int] = field(default_factory=list)
    start: int = 0
    at: float = 0.0
    rng: str | None = None


@dataclass(frozen=True)
class Generated(Record):
    """What one prompt of a generation produced."""

    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    completion_tokens: int
    proof: dict[str, Any] | None = None  # with ``params["proof"]``: :class:`~hypha_celery.runtimes.proofs.Proof` JSON
    # the prompt's ``resume`` tokens it continued after (0: it generated from the start, e.g. on the static path),
    # and whether a sampled row's generator state could not be restored (it was seeded afresh at the seam)
    resumed_from: int = 0
    reseeded: bool = False


@dataclass(frozen=True)
class Trained(Record):
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
class Generation:
    """What one generation job produced: per prompt a :class:`Generated` or the error that refused it."""

    outputs: list[Generated | Exception]
    time_to_first_token_s: float
    compute_s: float
