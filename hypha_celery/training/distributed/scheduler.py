"""DiLoCo from the scheduler's side: rounds of signed inner tasks, then a signed outer step.

::

    from hypha_celery.training import diloco
    job = diloco("tiny-llama", shards=[{"texts": [...]}, {"texts": [...]}, {"ref": "corpus-3"}],
                 rounds=10, inner_steps=50, outer_lr=0.7, outer_momentum=0.9, min_workers=2,
                 requirements={"cpu_cores": 1}, signing_key="scheduler.key", lr=1e-3, batch_size=8)
    job.progress()      # {"job", "round", "rounds", "stage", "finished", "arrived", "workers", "members", "history"}
    job.wait(timeout=3600)
    # {"job": ..., "model_id": "<job>-v10", "sha256": ..., "rounds": [{"round", "loss", "workers",
    #   "bytes_moved", "delta_bytes", "compression", "inner": [{"worker", "shard", "steps", "seconds", ...}],
    #   "refused", "failed", "duration_s", ...}, ...]}     (one entry: training/distributed/rounds.py)

Each round is a Celery ``group`` (canvas) of ``hypha.train`` tasks with a ``diloco`` block, each
signed like any task (:func:`hypha_celery.client.send_options`): one per live worker, read from
the registry when the round starts, on that worker's own queue, shards round-robin across rounds
(:mod:`.membership`: a worker that joins mid-job trains from the next round on, one that leaves is
tolerated; ``queue=`` sends them all to one queue instead). Best-fit placement would stack a
round's tasks on the one tightest node. They run on
the round's global version pinned by its manifest sha256 from round 2 on. The round then waits for
them with a deadline (``round_timeout``; and once ``min_workers`` have answered, at most
``straggler_s`` more for the rest) and sends the signed ``hypha.aggregate`` with the reports
that arrived and each one's weight: the size of the shard this scheduler sent that task
(:func:`shard_sizes`), never the sample count a worker reports; a time-boxed job (``inner_seconds``)
multiplies it by the steps each worker reports, capped (:mod:`.timebox`). ``compression`` (``none``,
``bf16``, ``int8``) and ``error_feedback`` go to every inner task (:mod:`.compression`); the last round's
tasks are told ``final`` so each worker drops the job's residual. A task that answers later is a
straggler: its delta stays in its round's folder, and the outer step refuses any delta whose job
or round is not its own. Fewer than ``min_workers`` reports by the deadline fail the job
(``RoundFailed``). A report counts only when its ``ref`` is the reporting task's own delta key
(:func:`~hypha_celery.training.distributed.layout.delta_key`) and its ``sha256`` a string: a worker cannot hand in
another task's delta, which would take that task's weight and be counted twice.

Why not a ``chord``: a chord's callback receives its header's results as arguments only when
the header completes, so the scheduler cannot sign them (the envelope signs the arguments'
digest), and a chord waits for every header task, so a lost worker would stall its round. The
group is the canvas; the deadline and the outer step's arguments stay with the scheduler.
Everything large (weights, deltas, momentum) stays in the workers' shared storage; the broker
and the result backend carry the reports (a few hundred bytes per task).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
from celery import Celery, group
from celery.result import AsyncResult

from hypha_celery.client import send_options
from hypha_celery.errors import DeltaRejected, InvalidSignature, InvalidTask, RoundFailed, UnsupportedModel
from hypha_celery.security import load_signing_key
from hypha_celery.training.distributed.compression import COMPRESSIONS
from hypha_celery.training.distributed.layout import delta_key
from hypha_celery.training.distributed.membership import Assignment, Members, assign, registry_members
from hypha_celery.training.distributed.rounds import inner_rows, round_entry
from hypha_celery.training.distributed.timebox import work_weights

__all__ = ["DilocoJob", "diloco", "shard_sizes"]

TERMINAL = ("SUCCESS", "FAILURE", "REVOKED")
# Inner tasks go to the queue every worker reads, so each idle worker takes one: best-fit placement would send
# a round's tasks to the same tightest node, one after another. Admission still decides where each runs.
SHARED_QUEUE = "hypha"
AGGREGATE_ATTEMPTS = 3
# An outer step refused for its inputs fails the job; any other failure (a lost worker, a timeout) re-runs it.
REFUSALS = (DeltaRejected, InvalidTask, InvalidSignature, UnsupportedModel)

log = logging.getLogger(__name__)
POLL_S = 0.25


@dataclass
class _Settings:
    model: str
    shards: list[dict[str, Any]]
    rounds: int
    inner_steps: int | None
    outer_lr: float
    outer_momentum: float
    min_workers: int | None  # None: every inner task the round sends
    requirements: dict[str, Any] | None
    aggregate_requirements: dict[str, Any]
    signing_key: nacl.signing.SigningKey | None
    round_timeout: float
    straggler_s: float
    queue: str | None
    train_kwargs: dict[str, Any] = field(default_factory=dict)
    shard_weights: list[int] = field(default_factory=list)  # one per shard: the weight its delta gets
    aggregate_options: dict[str, Any] = field(default_factory=dict)  # aggregator, trim, the norm bounds
    members: Members | None = None  # the round's live workers (membership.py); None: every shard to the queue
    inner_seconds: float | None = None  # a time box per inner task instead of (or under) inner_steps
    compression: str = "none"
    error_feedback: bool = True
    lora: dict[str, Any] | None = None  # a LoRA job: the adapter's settings (r, alpha, dropout, target_modules)

    def block(self, job: str, round_: int, version: str | None = None, pin: str | None = None) -> dict[str, Any]:
        """The ``diloco`` kwarg of the round's inner tasks (a LoRA job's names the round's adapter ``version``)."""
        block: dict[str, Any] = {"job": job, "round": round_}
        if self.lora is not None:
            block.update(adapter=version, **({"adapter_sha256": pin} if pin is not None else {}))
        if self.inner_steps is not None:
            block["inner_steps"] = self.inner_steps
        if self.inner_seconds is not None:
            block["inner_seconds"] = self.inner_seconds
        if self.compression != "none":
            block.update(compression=self.compression, error_feedback=self.error_feedback,
                         final=round_ == self.rounds)
        return block


class DilocoJob:
    """A running DiLoCo job: rounds are driven by a thread of this process; ``wait`` and ``progress`` read it."""

    def __init__(self, app: Celery, job: str, settings: _Settings) -> None:
        self.app = app
        self.job = job
        self.settings = settings
        self._lock = threading.Lock()
        self._progress: dict[str, Any] = {"job": job, "round": 0, "rounds": settings.rounds, "stage": "starting",
                                          "finished": 0, "arrived": 0, "workers": 0, "tasks": [],
                                          "history": []}
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._drive, name=f"diloco-{job}", daemon=True)
        self._cursor = 0  # the next shard, round-robin across rounds
        self._shard_of: dict[str, int] = {}  # the round's inner task id -> the shard it was sent

    def start(self) -> DilocoJob:
        self._thread.start()
        return self

    def progress(self) -> dict[str, Any]:
        """Where the job is: the round, its stage (``inner``, ``aggregate``, ``done``, ``failed``), the round's inner
        task ids (``tasks``), how many finished and how many reported (``arrived``), and past rounds (``history``)."""
        with self._lock:
            return {**self._progress, "history": list(self._progress["history"])}

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The final model and every round's figures; raises what failed the job, or ``TimeoutError``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"DiLoCo job {self.job} is still running after {timeout} s: {self.progress()}")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._progress.update(changes)

    def _drive(self) -> None:
        try:
            self._result = self._run()
            self._update(stage="done")
        except BaseException as exc:  # handed to wait(); the thread ends either way
            self._error = exc
            self._update(stage="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._done.set()

    def _run(self) -> dict[str, Any]:
        s = self.settings
        base, pin = s.model, None
        history: list[dict[str, Any]] = []
        if s.lora is not None:  # round 0: the job's first adapter, made once by an outer step, then trained by all
            self._update(stage="aggregate")
            first = self._send_aggregate(0, {"job": self.job, "round": 0, "base": s.model, "lora": s.lora,
                                             "seed": int(s.train_kwargs.get("seed", 0)),
                                             "requirements": s.aggregate_requirements})
            base, pin = first["model_id"], first["sha256"]
        for round_ in range(1, s.rounds + 1):
            started = time.monotonic()
            self._update(round=round_, stage="inner", finished=0, arrived=0, tasks=[])
            sent = self._assign(round_)
            reports, weights, failed = self._inner(round_, base, pin, sent)
            inner_s = time.monotonic() - started
            self._update(stage="aggregate")
            outcome = self._aggregate(round_, base, pin, reports, weights, need=self._need(sent))
            shards = {task: index for task, index in self._shard_of.items() if task in weights}
            entry = round_entry(round_, outcome, inner_rows(reports, shards), assigned=len(sent), failed=failed,
                                duration_s=time.monotonic() - started)
            entry["inner_s"] = round(inner_s, 3)  # the inner phase alone: a time-boxed round's T plus its stragglers
            history.append(entry)
            with self._lock:
                self._progress["history"].append(entry)
            base, pin = outcome["model_id"], outcome["sha256"]
        return {"job": self.job, "model_id": base, "sha256": pin, "rounds": history,
                **({"adapter_of": s.model} if s.lora is not None else {})}

    def _assign(self, round_: int) -> list[Assignment]:
        """The round's inner tasks from the live workers now (:mod:`.membership`); the cursor moves past them."""
        s = self.settings
        members = s.members() if s.members is not None else []
        sent = assign(len(s.shards), members, cursor=self._cursor, at_least=s.min_workers or 1,
                      shared_queue=s.queue or SHARED_QUEUE, turn=round_ - 1)
        self._cursor = (self._cursor + len(sent)) % len(s.shards)
        return sent

    def _need(self, sent: Sequence[Assignment]) -> int:
        """The deltas a round needs: ``min_workers``, else every inner task it sent."""
        return self.settings.min_workers or len(sent)

    def _inner(self, round_: int, base: str, pin: str | None, sent: Sequence[Assignment]
               ) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, str]]:
        """Send the round's group and collect the reports that arrive by its deadline, with each reporting task's
        weight (its shard's, as decided here) and why the others gave none."""
        s = self.settings
        signatures = []
        for assignment in sent:
            kwargs: dict[str, Any] = {**s.train_kwargs, "model": base, "data": s.shards[assignment.shard],
                                      "diloco": s.block(self.job, round_)}
            if s.lora is not None:  # the model stays the job's; the block names the adapter version, pinned
                kwargs.update(model=s.model, method="lora", lora=s.lora, diloco=s.block(self.job, round_, base, pin))
            if s.requirements is not None:
                kwargs["requirements"] = s.requirements
            options = send_options("hypha.train", kwargs, signing_key=s.signing_key, queue=s.queue or assignment.queue,
                                   model_sha256=pin if s.signing_key is not None and s.lora is None else None)
            signatures.append(self.app.signature("hypha.train", kwargs=kwargs, **options))
        results = group(signatures).apply_async().results
        self._shard_of = {result.id: assignment.shard for result, assignment in zip(results, sent, strict=True)}
        needed = self._need(sent)
        self._update(tasks=[result.id for result in results], workers=len(results),
                     members=[a.worker for a in sent if a.worker is not None])
        deadline = time.monotonic() + s.round_timeout
        quorum_at: float | None = None
        reports: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        while True:
            for result in results:
                if result.id in reports or result.id in failures or result.state not in TERMINAL:
                    continue
                _collect(result, round_, self.job, reports, failures)
            finished = len(reports) + len(failures)
            self._update(finished=finished, arrived=len(reports))
            now = time.monotonic()
            if len(reports) >= needed and quorum_at is None:
                quorum_at = now
            if finished == len(results):
                break
            if len(results) - len(failures) < needed:
                break  # too many failed to ever reach the quorum
            if now >= deadline or (quorum_at is not None and now >= quorum_at + s.straggler_s):
                break
            time.sleep(POLL_S)
        if len(reports) < needed:
            why = "; ".join(f"{task}: {reason}" for task, reason in failures.items()) or "no failures, too slow"
            raise RoundFailed(f"job {self.job} round {round_}: {len(reports)} of {len(results)} inner tasks reported "
                              f"within {s.round_timeout:g} s, fewer than min_workers ({needed}): {why}")
        late = [result.id for result in results if result.id not in reports and result.id not in failures]
        if late:  # stragglers: their deltas, if they ever land, stay in this round's folder, never applied
            self.app.control.revoke(late)
        sizes = s.shard_weights or shard_sizes(s.shards)
        weights = {result.id: sizes[self._shard_of[result.id]] for result in results if result.id in reports}
        if s.inner_seconds is not None:  # the work each did in the time box: shard size x reported steps, capped
            weights = work_weights(weights, reports)
        failed = {**failures, **{task: "late: revoked at the round's deadline" for task in late}}
        return [reports[result.id] for result in results if result.id in reports], weights, failed

    def _aggregate(self, round_: int, base: str, pin: str | None, reports: list[dict[str, Any]],
                   weights: dict[str, int], *, need: int | None = None) -> dict[str, Any]:
        """Send the signed outer step: the reports as they came, and the weights decided here (never theirs)."""
        s = self.settings
        kwargs: dict[str, Any] = {"job": self.job, "round": round_, "base": base, "deltas": reports,
                                  "weights": weights, "outer_lr": s.outer_lr, "outer_momentum": s.outer_momentum,
                                  "min_workers": need or s.min_workers or len(reports),
                                  "requirements": s.aggregate_requirements,
                                  **s.aggregate_options}
        if pin is not None:
            kwargs["base_sha256"] = pin
        return self._send_aggregate(round_, kwargs)

    def _send_aggregate(self, round_: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Send ``hypha.aggregate`` signed, again on a failure that is not a refusal (idempotent by round)."""
        s = self.settings
        for attempt in range(1, AGGREGATE_ATTEMPTS + 1):
            options = send_options("hypha.aggregate", kwargs, signing_key=s.signing_key, queue=s.queue)
            result = self.app.send_task("hypha.aggregate", kwargs=kwargs, **options)
            try:
                answer = result.get(timeout=s.round_timeout, propagate=True)
            except REFUSALS:
                raise
            except Exception as exc:  # its worker died, it timed out: the same inputs again (idempotent by round)
                if attempt == AGGREGATE_ATTEMPTS:
                    raise
                log.warning("job %s round %d: the outer step failed (%s: %s); sending it again", self.job, round_,
                            type(exc).__name__, exc)
                self._update(stage="aggregate", retried=attempt)
                continue
            return dict(answer["output"])
        raise AssertionError("unreachable")


def _collect(result: AsyncResult, round_: int, job: str, reports: dict[str, dict[str, Any]],
             failures: dict[str, str]) -> None:
    if result.state != "SUCCESS":
        failures[result.id] = f"{result.state} {result.result!r}"
        return
    answer = result.result if isinstance(result.result, dict) else {}
    output = answer.get("output")
    report = output.get("diloco") if isinstance(output, dict) else None
    if not isinstance(report, dict) or report.get("job") != job or report.get("round") != round_:
        failures[result.id] = "answered without this round's diloco report"
        return
    own = delta_key(job, round_, result.id)
    if report.get("ref") != own or not isinstance(report.get("sha256"), str):
        # Another task's delta key would take that task's weight (and count one delta twice): refused here.
        failures[result.id] = f"reported delta {report.get('ref')!r}, not its own {own!r} with a sha256"
        return
    reports[result.id] = report


def shard_sizes(shards: Sequence[dict[str, Any]], given: Sequence[int] | None = None) -> list[int]:
    """The weight of each shard's delta in the outer mean: ``given``, else each shard's number of texts when every
    shard is inline, else 1 each (a stored data set's size is not known here)."""
    if given is not None:
        sizes = list(given)
        if len(sizes) != len(shards) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"shard_weights must be {len(shards)} positive integers, one per shard, got {given!r}")
        return sizes
    if all(isinstance(shard.get("texts"), list) and shard["texts"] for shard in shards):
        return [len(shard["texts"]) for shard in shards]
    return [1] * len(shards)


def diloco(
    model: str,
    shards: Sequence[dict[str, Any]],
    rounds: int,
    inner_steps: int | None = None,
    *,
    inner_seconds: float | None = None,
    compression: str = "none",
    error_feedback: bool = True,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    min_workers: int | None = None,
    requirements: dict[str, Any] | None = None,
    signing_key: nacl.signing.SigningKey | str | os.PathLike[str] | None = None,
    round_timeout: float = 600.0,
    straggler_s: float | None = None,
    aggregate_requirements: dict[str, Any] | None = None,
    queue: str | None = None,
    job: str | None = None,
    app: Celery | None = None,
    shard_weights: Sequence[int] | None = None,
    aggregator: str = "mean",
    trim: float | None = None,
    max_delta_norm_ratio: float | None = 10.0,
    max_base_norm_ratio: float | None = 1.0,
    members: Members | None = None,
    method: str = "full",
    lora: dict[str, Any] | None = None,
    **train_kwargs: Any,
) -> DilocoJob:
    """Start a DiLoCo job training ``model`` on ``shards`` (one inner task per shard per round); see the module doc.

    Each round sends one inner task per live worker (``members``, default :func:`.membership.registry_members`: the
    registry's workers with shared storage that fit ``requirements``), at most one per shard, shards round-robin
    across rounds; ``min_workers`` (default: every inner task the round sent) is how many deltas a round needs, and
    a round sends at least that many (the extra ones to the shared queue). ``train_kwargs`` go to every
    inner ``hypha.train`` (``lr``, ``batch_size``, ``max_length``, ``seed``, ...). ``shard_weights`` weigh each
    shard's delta in the mean (:func:`shard_sizes`); ``aggregator``, ``trim`` and the two norm bounds go to
    ``hypha.aggregate`` as they are (see :mod:`hypha_celery.training.distributed.outer`; ``None`` turns a bound off).
    ``inner_seconds`` time-boxes each inner task (``inner_steps``, when also given, caps its steps; one of the two is
    needed); ``compression`` and ``error_feedback``: :mod:`hypha_celery.training.distributed.compression`.
    ``method="lora"`` (``lora``: r, alpha, dropout, target_modules, as ``hypha.train`` takes them) trains a LoRA
    adapter of ``model`` instead of its weights: round 0 (``hypha.aggregate``) makes the job's first adapter
    (``<job>-v0``, from ``seed``), each round's inner tasks continue the current one and send its tensors' delta only,
    and each version is an adapter of ``model``, served like any (``hypha.generate`` with its id).
    """
    if method not in ("full", "lora"):
        raise ValueError(f"method must be 'full' or 'lora', got {method!r}")
    if lora is not None and method != "lora":
        raise ValueError("lora settings apply to method 'lora' only")
    if not shards:
        raise ValueError("diloco needs at least one shard")
    if rounds < 1 or (inner_steps is not None and inner_steps < 1):
        raise ValueError("rounds and inner_steps must be at least 1")
    if inner_steps is None and inner_seconds is None:
        raise ValueError("diloco needs inner_steps or inner_seconds")
    if inner_seconds is not None and not 0 < inner_seconds <= 86_400:
        raise ValueError(f"inner_seconds must be above 0 and at most 86400, got {inner_seconds!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if min_workers is not None and not 1 <= min_workers <= len(shards):
        raise ValueError(f"min_workers must be from 1 to the number of shards ({len(shards)}), got {min_workers}")
    if app is None:
        from hypha_celery.celery import app as default_app

        app = default_app
    settings = _Settings(
        model=model, shards=[dict(shard) for shard in shards], rounds=rounds, inner_steps=inner_steps,
        outer_lr=outer_lr, outer_momentum=outer_momentum, min_workers=min_workers, requirements=requirements,
        aggregate_requirements=aggregate_requirements or {"cpu_cores": 0.5, "memory": "512MiB"},
        signing_key=signing_key if signing_key is None or isinstance(signing_key, nacl.signing.SigningKey)
        else load_signing_key(signing_key), round_timeout=round_timeout,
        straggler_s=round_timeout if straggler_s is None else straggler_s, queue=queue, train_kwargs=train_kwargs,
        shard_weights=shard_sizes(shards, shard_weights),
        aggregate_options={"aggregator": aggregator, "max_delta_norm_ratio": max_delta_norm_ratio,
                           "max_base_norm_ratio": max_base_norm_ratio, **({} if trim is None else {"trim": trim})},
        members=members if members is not None else registry_members(requirements),
        inner_seconds=inner_seconds, compression=compression, error_feedback=error_feedback,
        lora=(dict(lora or {"r": 8}) if method == "lora" else None),
    )
    return DilocoJob(app, job or f"dl-{uuid.uuid4().hex[:12]}", settings).start()
