"""What a DiLoCo round did, as the scheduler shows it: ``job.progress()``'s history and ``hypha-celery run diloco``.

One entry per round (:func:`round_entry`), built by the scheduler from the outer step's answer, the
inner tasks' reports and its own assignment: the bytes moved (the global version pulled and the delta
pushed, each worker's and the total), each inner task's worker, shard, steps, seconds and loss, the
deltas the outer step refused (with its reasons) and the inner tasks that failed or came too late (with
the scheduler's), and the round's wall time. ``compression`` is the bytes of the deltas over those of
a float32 pseudo-gradient of the same tensors (the parameters each inner task reports x 4: 1.0 for
an uncompressed delta). :func:`describe_round` turns an entry into the CLI's lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hypha_celery.units import format_size

__all__ = ["describe_round", "inner_rows", "round_entry"]


def _number(value: Any) -> float | None:
    """A figure a worker reported, or None unless it is a finite number (information only)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) < 2**53 else None


def inner_rows(reports: Sequence[Mapping[str, Any]], shards: Mapping[str, int]) -> list[dict[str, Any]]:
    """One row per reporting inner task: worker, shard (the scheduler's), steps, seconds (task and training), bytes,
    encoding and loss (theirs)."""
    rows = []
    for report in reports:
        task = str(report.get("ref", "")).rsplit("/", 1)[-1].removesuffix(".safetensors")
        rows.append({"task": task, "worker": report.get("worker"), "shard": shards.get(task),
                     "steps": _number(report.get("steps")), "seconds": _number(report.get("seconds")),
                     "delta_bytes": _number(report.get("bytes")), "base_bytes": _number(report.get("base_bytes")),
                     "parameters": _number(report.get("parameters")), "train_s": _number(report.get("train_s")),
                     "compression": report.get("compression") if isinstance(report.get("compression"), str) else None,
                     "loss": _number(report.get("loss"))})
    return sorted(rows, key=lambda row: (str(row["worker"]), row["task"]))


def round_entry(round_: int, outcome: Mapping[str, Any], rows: list[dict[str, Any]], *, assigned: int,
                failed: Mapping[str, str], duration_s: float) -> dict[str, Any]:
    """The history entry of a round: the outer step's figures, the inner tasks' rows, what failed and why."""
    delta_bytes = sum(row["delta_bytes"] or 0 for row in rows)
    dense = sum(4 * (row["parameters"] or 0) for row in rows)
    return {
        "round": round_, "loss": outcome.get("loss"), "inner_loss": outcome.get("inner_loss"),
        "workers": outcome.get("workers", []), "bytes_moved": outcome.get("bytes_moved", 0),
        "samples": outcome.get("samples"), "refused": outcome.get("refused", []), "model_id": outcome.get("model_id"),
        "assigned": assigned, "inner": rows, "failed": dict(failed),
        "delta_bytes": int(delta_bytes), "compression": round(delta_bytes / dense, 4) if dense else None,
        "duration_s": round(duration_s, 3),
        "outer_memory_peak": outcome.get("memory_peak"),  # the outer step's peak in its executor, bytes
    }


def describe_round(entry: Mapping[str, Any]) -> list[str]:
    """The CLI's lines for a round done: a summary, a line per inner task, one per refusal or failure."""
    loss = entry.get("loss")
    ratio = entry.get("compression")
    lines = [f"round {entry['round']}: loss {'-' if loss is None else f'{loss:.4f}'}  "
             f"workers {len(entry.get('workers') or ())}/{entry.get('assigned', '?')}  "
             f"{format_size(int(entry.get('bytes_moved') or 0))} moved"
             + ("" if ratio is None else f" (deltas {ratio:.2f}x float32)")
             + f"  {entry.get('duration_s', 0.0):.1f} s"]
    for row in entry.get("inner") or ():
        steps, seconds = row.get("steps"), row.get("seconds")
        lines.append(f"  {row.get('worker')}: shard {row.get('shard', '?')}, "
                     f"{'?' if steps is None else int(steps)} steps in {'?' if seconds is None else f'{seconds:.1f}'} s, "
                     f"delta {format_size(int(row.get('delta_bytes') or 0))}")
    for refusal in entry.get("refused") or ():
        lines.append(f"  refused {refusal.get('reason')}")
    for task, reason in (entry.get("failed") or {}).items():
        lines.append(f"  no delta from {task}: {reason}")
    return lines
