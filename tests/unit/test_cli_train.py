"""``hypha-celery run train``'s progress display: a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
from typing import Any

from hypha_celery.cli.train import TrainProgress, train_line


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(step: int) -> dict[str, Any]:
    return {"stage": "run", "epoch": 1, "epochs": 1, "step": step, "steps": 10, "percent": step * 10.0,
            "loss": 2.0 - step / 10, "tokens_per_s": 1234.5, "eta_s": 75.0}


def test_a_progress_line_names_step_percent_loss_rate_and_eta() -> None:
    assert train_line(_run(3)) == "step 3/10   30.0%  loss 1.7000  1234 tok/s  ETA 01:15"


def test_off_a_terminal_it_writes_plain_lines_and_a_last_one_from_the_result() -> None:
    # Given a display on a pipe that may write every update
    out = io.StringIO()
    progress = TrainProgress(out, every=0)
    # When a load stage, two steps (one repeated) and the result arrive
    for info in ({"stage": "load", "step": 0}, _run(1), _run(1), _run(2)):
        progress.update(info)
    progress.close({"steps": 10, "final_loss": 0.5, "metrics": {"tokens_per_s": 999.0}})
    # Then each distinct report is one plain line, no control characters, and the last is the finished run
    lines = out.getvalue().splitlines()
    assert lines == ["[load]", train_line(_run(1)), train_line(_run(2)),
                     "step 10/10  100.0%  loss 0.5000  999 tok/s  ETA 00:00"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_off_a_terminal_lines_are_periodic() -> None:
    # Given a display that writes at most one line a minute, When three steps arrive at once
    out = io.StringIO()
    progress = TrainProgress(out, every=60)
    for step in (1, 2, 3):
        progress.update(_run(step))
    # Then only the first was written
    assert out.getvalue().splitlines() == [train_line(_run(1))]


def test_on_a_terminal_it_redraws_one_bar_that_ends_full() -> None:
    # Given a display on a terminal, When steps arrive and the task ends
    out = _Terminal()
    progress = TrainProgress(out)
    for step in (1, 5):
        progress.update(_run(step))
    progress.close({"steps": 10, "final_loss": 0.5})
    text = out.getvalue()
    # Then one bar is redrawn in place (carriage returns, not new lines) and it ends full, with the final loss
    frames = text.split("\r")
    assert text.count("\n") == 1 and len(frames) >= 3
    assert "[####" in frames[-1] and "-]" not in frames[-1] and "step 10/10" in frames[-1] and "loss 0.5000" in frames[-1]
