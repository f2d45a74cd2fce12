"""Admission: a task runs only once its reservation succeeded.

Three outcomes besides a lease:

* **busy** (fits this node, not now): the task is deferred - re-published
  with a countdown that grows exponentially with jitter, to a worker that
  has room now if placement finds one, else back to its queue. Never a hot
  ``Reject(requeue=True)`` loop (Celery #2012, #9082). The bound is
  ``[worker.admission] max_wait`` seconds since the task first reached a
  worker; past it the task fails with ``AdmissionTimeout``.
* **not here** (this node is too small, another live node is not): deferred
  to that node's worker, at once the first time and with backoff after.
* **infeasible** (no live worker could ever fit it): ``InsufficientCapabilities``
  at once, saying what was asked and the largest worker seen.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypha_celery.config import AdmissionConfig
from hypha_celery.errors import AdmissionTimeout, NotHere, ResourcesBusy
from hypha_celery.resources.ledger import Call, Lease, Ledger
from hypha_celery.resources.placement import Placement
from hypha_celery.resources.requirements import Requirements

__all__ = ["Deferral", "admit", "backoff", "plan_deferral"]


@dataclass(frozen=True)
class Deferral:
    """When and where a task that could not be admitted tries again."""

    countdown: float
    queue: str | None  # None: back to the queue it came from
    attempt: int
    waited: float
    reason: str


def admit(
    ledger: Ledger,
    placement: Placement,
    req: Requirements,
    *,
    task_id: str,
    holder: str,
    worker_id: str,
    via: Callable[[Call], Any] | None = None,
) -> Lease:
    """Reserve ``req`` for ``task_id`` on this node, or raise why not.

    ``ResourcesBusy`` (wait), ``NotHere`` (another live node can fit it),
    ``InsufficientCapabilities`` (no live node ever can), ``DuplicateTask``.
    ``via``: where the reservation script travels (:meth:`Ledger.try_reserve`).
    """
    answer = ledger.try_reserve(req, holder=holder, task_id=task_id, via=via)
    if isinstance(answer, Lease):
        return answer
    if answer.why == "infeasible":
        elsewhere = placement.feasible(req, exclude=worker_id)
        if elsewhere is None:
            raise placement.infeasible(req)
        raise NotHere(f"{ledger.node} can never fit {req.describe()}; {elsewhere.worker} can", elsewhere.queue)
    raise ledger.refusal(req, answer, task_id)


def backoff(attempt: int, cfg: AdmissionConfig, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter: ``initial * 2**attempt`` capped at ``max``, times [0.5, 1)."""
    base = min(cfg.backoff_max, cfg.backoff_initial * (2 ** min(attempt, 30)))
    return base * (0.5 + rand() / 2)


def plan_deferral(
    cfg: AdmissionConfig,
    placement: Placement,
    req: Requirements,
    reason: ResourcesBusy | NotHere,
    *,
    node_id: str,
    worker_id: str,
    attempt: int,
    first_seen: float,
    now: float | None = None,
    rand: Callable[[], float] = random.random,
) -> Deferral:
    """Where and when a task that is busy here (or not here) tries again; ``AdmissionTimeout`` past the bound."""
    now = time.time() if now is None else now
    waited = now - first_seen
    if waited > cfg.max_wait:
        raise AdmissionTimeout(
            f"waited {waited:.0f}s for {req.describe()} over {attempt} attempts, past the bound "
            f"([worker.admission] max_wait = {cfg.max_wait:g}s); last reason: {reason}"
        )
    if isinstance(reason, NotHere):
        # at once the first time; after that it backs off too, so nodes that each think the
        # other fits (placement's view is coarser than the ledger's) cannot bounce it quickly
        delay = backoff(attempt - 1, cfg, rand) if attempt else 0.0
        return Deferral(delay, reason.queue, attempt + 1, waited, str(reason))
    choice = placement.choose(req, exclude=worker_id)
    delay = backoff(attempt, cfg, rand)
    if choice is not None and choice.node != node_id:
        return Deferral(min(delay, cfg.backoff_initial), choice.queue, attempt + 1, waited, str(reason))
    return Deferral(delay, None, attempt + 1, waited, str(reason))
