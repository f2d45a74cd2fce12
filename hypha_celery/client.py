"""Submitting ML work from a scheduler: placement, signing, ``apply_async``.

::

    from hypha_celery.client import submit
    result = submit("hypha.infer", model="mlp", inputs=[[5.1, 3.5, 1.4, 0.2]],
                    requirements={"cpu_cores": 1, "memory": "512MiB"},
                    signing_key="scheduler.key")
    result.get(timeout=30)["output"]

``model_sha256`` (what ``hypha-celery models sha256 ID`` prints) pins the
exact model in the signed envelope: a worker whose store holds another
manifest under that id refuses with ``ModelPinMismatch``. A pin needs
``signing_key``: it travels in the envelope.

Results are signed by the worker that produced them (its ``attestation``, see
:mod:`hypha_celery.security.attestation`): ``submit(..., verify=True)`` (or
``result.get(verify=True)``) checks it and ``result.signer`` is then the worker's
peer id; ``allowed_workers`` limits which workers may answer. A signed task's
result must also answer the envelope that was sent. A result that fails raises
``InvalidSignature`` naming why.

A signed task's nonce is recorded in the registry Redis just before it is sent
(:func:`hypha_celery.security.record_sent`): its envelope's lifetime
(``envelope_ttl``) then bounds the time until it was sent, and a task that
waits in a busy queue past it still runs (see :mod:`hypha_celery.security.verifier`).

A generation's text arrives token by token with :func:`stream`, which reads the task's token stream
(:mod:`hypha_celery.token_stream`) with blocking ``XREAD``::

    for piece in stream(submit("hypha.generate", model="tiny-llama", prompt="Once"), timeout=60):
        print(piece, end="", flush=True)

Placement is best fit over the live free-resource indexes
(:mod:`hypha_celery.resources.placement`): among workers that fit *now*, the one whose
scarcest resource is tightest, preferring one that already holds the model (or an
adapter's base). When none fits now but one could, the task
goes to the shared ``hypha`` queue and waits there for admission; when no
live worker could ever fit it, ``InsufficientCapabilities`` is raised here,
before anything is sent.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import nacl.signing
import redis
from celery import Celery, states
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult
from redis.exceptions import RedisError

from hypha_celery import keys
from hypha_celery.config import load_config
from hypha_celery.errors import ConfigError, InvalidSignature, RegistryUnavailable
from hypha_celery.resources.requirements import SERVING_CPU_MILLI, SERVING_TASKS, Requirements
from hypha_celery.routing import placement_for
from hypha_celery.security import (
    ENVELOPE_HEADER,
    load_signing_key,
    record_sent,
    replay_window,
    request_digest,
    signed_options,
    verify_result,
)
from hypha_celery.token_stream import SUCCESS, End, Tokens, error_of, read, signed_by

__all__ = ["HyphaResult", "send_options", "stream", "submit"]

log = logging.getLogger(__name__)


def submit(
    task_name: str,
    *,
    model: str | None = None,
    inputs: Any = None,
    requirements: dict[str, Any] | None = None,
    signing_key: nacl.signing.SigningKey | str | os.PathLike[str] | None = None,
    app: Celery | None = None,
    queue: str | None = None,
    envelope_ttl: float = 300.0,
    model_sha256: str | None = None,
    verify: bool = False,
    allowed_workers: Iterable[str] | None = None,
    **task_kwargs: Any,
) -> HyphaResult:
    """Place, sign and send one hypha task; returns its :class:`HyphaResult` (``verify``: its ``get`` checks the
    worker's signature; ``allowed_workers``: peer ids of the workers trusted to answer, implies ``verify``)."""
    if model_sha256 is not None and signing_key is None:
        raise ValueError("model_sha256 travels in the signed envelope: pass signing_key too")
    if app is None:
        from hypha_celery.celery import app as default_app

        app = default_app
    kwargs: dict[str, Any] = dict(task_kwargs)
    if model is not None:
        kwargs["model"] = model
    if inputs is not None:
        kwargs["inputs"] = inputs
    if requirements is not None:
        kwargs["requirements"] = requirements
    options = send_options(task_name, kwargs, signing_key=signing_key, queue=queue, envelope_ttl=envelope_ttl,
                           model_sha256=model_sha256)
    result: HyphaResult = app.send_task(task_name, kwargs=kwargs, result_cls=functools.partial(HyphaResult, app=app),
                                        **options)
    result.verify = verify or allowed_workers is not None
    result.allowed_workers = None if allowed_workers is None else list(allowed_workers)
    result.task_name = task_name
    result.request_sha256 = request_digest(options.get("headers", {}).get(ENVELOPE_HEADER))
    return result


class HyphaResult(AsyncResult):
    """A hypha task's ``AsyncResult`` whose ``get`` can check the answering worker's signed attestation.

    ``signer`` is the peer id of the worker whose signature was checked (None until then).
    """

    verify = False
    allowed_workers: list[str] | None = None
    task_name: str | None = None
    request_sha256: str | None = None
    signer: str | None = None

    def get(self, *args: Any, verify: bool | None = None, allowed_workers: Iterable[str] | None = None,
            **kwargs: Any) -> Any:
        """Celery's ``get``; with ``verify`` (or the handle's option) ``InvalidSignature`` unless the result is signed
        by a worker (among ``allowed_workers``, when given) for this task id, task and request."""
        value = super().get(*args, **kwargs)
        allowed = self.allowed_workers if allowed_workers is None else list(allowed_workers)
        if verify or (verify is None and (self.verify or allowed is not None)):
            if allowed is None:  # any key signs: trust the identity the answering worker registered
                allowed = [registered_peer(value)]
            self.signer = verify_result(value, self.id, allowed=allowed, request_digest=self.request_sha256,
                                        task_name=self.task_name)
        return value

    wait = get  # Celery's AsyncResult.wait is its get: ours must check too (``.result``/``.info`` are unchecked)


def stream(result: AsyncResult, *, timeout: float = 300.0, row: int = 0, verify: bool | None = None,
           allowed_workers: Iterable[str] | None = None) -> Iterator[str]:
    """The text of generation ``result`` (a ``hypha.generate`` task) as it grows: each new piece, once.

    Joined, the pieces are the final ``output["text"]``. Reads the task's token stream from its
    start with blocking ``XREAD`` (so it works before, while and after the task runs), ends at its end
    entry, and raises the task's error (a class of :mod:`hypha_celery.errors`) when it failed;
    Celery's ``TimeoutError`` after ``timeout`` seconds. The stream lives in the result backend's
    Redis: a result backend that is not a Redis is refused with ``ConfigError``. While nothing comes
    it reads the task's state every two seconds, in case the task ended without writing a stream.
    With ``verify`` (default: the handle's own, as :func:`submit` set it) every entry must carry the signature
    of its worker's identity (one of ``allowed_workers``' peer ids, else the identity the worker registered), or
    ``InvalidSignature`` before any of its text is yielded; a worker that signs nothing fails it.
    """
    client = getattr(result.backend, "client", None)
    if not isinstance(client, redis.Redis):
        raise ConfigError(f"client.stream reads the result backend's Redis; this app's result backend is "
                          f"{type(result.backend).__name__}, not a Redis (set result_backend to a redis:// URL)")
    allowed = list(allowed_workers) if allowed_workers is not None else getattr(result, "allowed_workers", None)
    check = _EntryCheck(result.id, allowed) if verify or (
        verify is None and (getattr(result, "verify", False) or allowed is not None)) else None
    shown = 0  # characters of the row's text yielded so far
    deadline = time.monotonic() + timeout
    try:
        for entry in read(client, keys.schema().token_stream(result.id), timeout=timeout,
                          idle=lambda: _ended_without_stream(result, check is not None)):
            if check is not None and entry.id:
                check(entry)
            if isinstance(entry, End):
                if entry.status != SUCCESS:
                    raise error_of(entry)
                if len(entry.text) > shown:  # read from the result: a task that ended with no end entry
                    yield entry.text[shown:]
                return
            if isinstance(entry, Tokens) and entry.row == row and entry.offset + len(entry.text) > shown:
                piece = entry.text[max(0, shown - entry.offset):]
                shown = entry.offset + len(entry.text)
                yield piece
    except TimeoutError:
        raise ResultTimeout(f"task {result.id}: its token stream did not end within {timeout:g} s "
                            f"({max(0.0, deadline - time.monotonic()):.1f} s left)") from None


class _EntryCheck:
    """``client.stream``'s check of each entry: signed by the identity that its run's worker is trusted to hold."""

    def __init__(self, task_id: str, allowed: list[str] | None) -> None:
        self.task_id = task_id
        self.allowed = allowed
        self.signer = ""

    def __call__(self, entry: Tokens | End) -> None:
        worker, peer = entry.raw.get("worker", ""), entry.raw.get("peer", "")
        if worker:  # a run begins (or ends with no token): who signs it, and is that its worker's identity
            trusted = self.allowed if self.allowed is not None else [_identity_of(worker)]
            if not peer or peer not in trusted:
                raise InvalidSignature(f"task {self.task_id}: its token stream's run on {worker!r} is signed by "
                                       f"{peer or 'nobody'!r}, not an identity this client trusts")
            self.signer = peer
        if not signed_by(self.signer, self.task_id, entry.raw):
            raise InvalidSignature(f"task {self.task_id}: token stream entry {entry.id} is not signed by its worker "
                                   "(changed, or written by someone else)")


def _ended_without_stream(result: AsyncResult, verify: bool = False) -> End | None:
    """The end of a task that finished without a stream (a worker that writes none): its text or its error."""
    if not result.ready():
        return None
    if result.state == states.SUCCESS:
        value = result.get(timeout=5, verify=True) if verify and isinstance(result, HyphaResult) else result.result
        output = value.get("output", {}) if isinstance(value, dict) else {}
        return End(status=SUCCESS, text=str(output.get("text", "")))
    result.get(propagate=True, timeout=1)  # raises the task's error as Celery rebuilt it
    return End(status=result.state, error="", message=f"the task ended {result.state}")


def registered_peer(result: Any) -> str:
    """The peer id the registry lists for the worker a result names: without an allowed set, the only key whose
    signature means something (anyone who can write the result backend can sign with a key of their own)."""
    worker = result.get("worker") if isinstance(result, dict) else None
    if not isinstance(worker, str) or not worker:
        raise InvalidSignature("the result names no worker, so no registered identity can vouch for it")
    return _identity_of(worker)


def _identity_of(worker: str) -> str:
    """The peer id ``worker`` registered: its live record's, else the one kept after the record expired."""
    client = placement_for().redis
    try:
        peer = client.hget(keys.worker(worker), "peer_id") or client.hget(keys.schema().peers(), worker)
    except RedisError as exc:
        raise RegistryUnavailable(f"cannot read worker {worker!r}'s identity from the registry: {exc}") from None
    if not peer:
        raise InvalidSignature(f"worker {worker!r} has no identity in the registry (it never registered one, or it "
                               "does not sign); pass allowed_workers=[<its peer id>] to verify what it signs")
    return peer.decode() if isinstance(peer, bytes) else str(peer)


def send_options(
    task_name: str,
    kwargs: dict[str, Any],
    *,
    signing_key: nacl.signing.SigningKey | str | os.PathLike[str] | None = None,
    queue: str | None = None,
    envelope_ttl: float = 300.0,
    model_sha256: str | None = None,
) -> dict[str, Any]:
    """The ``queue``, ``task_id`` and signed ``headers`` for sending ``kwargs`` (placed by their requirements).

    What :func:`submit` sends with; canvas users (``hypha_celery.training``) put them on signatures.
    The nonce is recorded as sent now, so send the task right after.
    """
    if queue is None:
        model = kwargs.get("model")
        serving = SERVING_CPU_MILLI if task_name in SERVING_TASKS else None  # it shares its device: place it so
        queue = _place(Requirements.parse(kwargs.get("requirements"), serving_cpu_milli=serving),
                       model if isinstance(model, str) else None)
    options: dict[str, Any] = {"queue": queue}
    if signing_key is not None:
        key = signing_key if isinstance(signing_key, nacl.signing.SigningKey) else load_signing_key(signing_key)
        options.update(signed_options(key, task_name, kwargs=kwargs, ttl=envelope_ttl, model_sha256=model_sha256))
        _record(options["headers"][ENVELOPE_HEADER])
    return options


def _record(envelope: dict[str, Any]) -> None:
    """Record the envelope's nonce as sent now, so a backlog in the queue does not count against its expiry."""
    config = load_config()
    try:
        record_sent(placement_for().redis, envelope, window=replay_window(config))
    except RegistryUnavailable as exc:  # the first worker to take it records it instead, if before its expiry
        log.warning("%s: the task must reach a worker within its envelope's lifetime", exc)


def _place(req: Requirements, model: str | None) -> str:
    placement = placement_for()
    try:
        choice = placement.choose(req, model=model)
        if choice is not None:
            return choice.queue
        if placement.feasible(req) is None and placement.any_live_worker():
            raise placement.infeasible(req)
    except RegistryUnavailable:
        pass  # no registry to read: the shared queue still reaches every worker
    return "hypha"
