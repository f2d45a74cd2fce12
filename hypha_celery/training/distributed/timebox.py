"""Time-boxed DiLoCo rounds: each worker trains for ``inner_seconds``, and its delta weighs the work it did.

With ``inner_steps`` every inner task takes the same steps and a round lasts as long as its slowest
worker; with ``inner_seconds = T`` each trains as many steps as fit in T on its hardware (the training
loop stops before a step that would end past T) and reports them, so a slow machine does fewer steps
instead of holding the round. The outer mean then weighs each delta by the work behind it
(:func:`work_weights`): the size of the shard the scheduler sent (what it signs) x the steps the worker
reported, those capped at :data:`STEPS_CAP_RATIO` x the round's lower median of reported steps, so a
worker that lies about its steps gains at most that factor over an honest median one (its delta's values
stay bounded by the outer step's norm checks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["STEPS_CAP_RATIO", "reported_steps", "work_weights"]

STEPS_CAP_RATIO = 4
MAX_STEPS = 10_000_000


def reported_steps(report: Mapping[str, Any]) -> int:
    """The optimizer steps a report claims, as a positive integer (1 when it is not one)."""
    steps = report.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        return 1
    return steps


def work_weights(sizes: Mapping[str, int], reports: Mapping[str, Mapping[str, Any]],
                 cap_ratio: int = STEPS_CAP_RATIO) -> dict[str, int]:
    """Each reporting task's weight: its shard's size x its reported steps, capped at ``cap_ratio`` x the lower
    median of the round's reported steps (task ids of ``reports`` only)."""
    steps = {task: reported_steps(report) for task, report in reports.items()}
    ordered: Sequence[int] = sorted(steps.values())
    if not ordered:
        return {}
    cap = cap_ratio * ordered[(len(ordered) - 1) // 2]
    return {task: sizes[task] * min(count, cap) for task, count in steps.items()}
