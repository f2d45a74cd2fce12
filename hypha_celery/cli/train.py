"""``hypha-celery run train`` and ``run diloco``: training submitted from a shell, its progress drawn on stderr."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import click

from hypha_celery.cli.run import _BROKER, _KEY, _PIN, _TIMEOUT, _result, _submission, _submit, _verify_options
from hypha_celery.errors import HyphaError

__all__ = ["TrainProgress", "run_diloco", "run_train", "train_line"]


def _train_data(data: str | None, dataset: str | None) -> dict[str, Any]:
    """``--data FILE`` (JSON ``{"texts", "labels"}`` or one text per line) or ``--dataset ID``: exactly one."""
    if (data is None) == (dataset is None):
        raise click.UsageError("give exactly one of --data FILE or --dataset ID")
    if data is None:
        return {"ref": dataset}
    text = Path(data).read_text(encoding="utf-8")
    if data.endswith(".json"):
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"{data}: not JSON ({exc})", param_hint="--data") from None
        if not isinstance(loaded, dict):
            raise click.BadParameter(f"{data}: a JSON object with texts (and labels) expected", param_hint="--data")
        return loaded
    return {"texts": [line for line in text.splitlines() if line.strip()]}


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def train_line(info: dict[str, Any]) -> str:
    """One PROGRESS meta of ``hypha.train`` as text: step, percent, loss, tokens/s, ETA (what is known)."""
    parts = [f"step {info.get('step', 0)}/{info.get('steps', '?')}", f"{float(info.get('percent') or 0):5.1f}%"]
    if isinstance(info.get("loss"), (int, float)):
        parts.append(f"loss {info['loss']:.4f}")
    if isinstance(info.get("tokens_per_s"), (int, float)):
        parts.append(f"{info['tokens_per_s']:.0f} tok/s")
    if "eta_s" in info:
        parts.append(f"ETA {_clock(info['eta_s'])}")
    return "  ".join(parts)


class TrainProgress:
    """Draws ``hypha.train``'s PROGRESS on ``file``: click's bar on a terminal, else a plain line every ``every`` s."""

    def __init__(self, file: TextIO, *, every: float = 2.0) -> None:
        self.file = file
        self.tty = file.isatty()
        self.every = every
        self._bar: Any = None
        self._shown: dict[str, Any] | None = None
        self._info: dict[str, Any] = {}
        self._last_line = -math.inf
        self._stage: str | None = None

    def update(self, info: dict[str, Any]) -> None:
        """Show one PROGRESS meta (repeats of the last one are ignored)."""
        if info == self._shown:
            return
        self._shown = info
        stage = info.get("stage")
        if stage != "run":
            if stage != self._stage:
                click.echo(f"[{stage or 'waiting'}]", file=self.file)
            self._stage = stage
            return
        self._stage = stage
        self._info = info
        steps = info.get("steps")
        if self.tty and isinstance(steps, int) and steps > 0:
            if self._bar is None:
                self._bar = click.progressbar(length=steps, file=self.file, show_eta=False, show_percent=False,
                                              show_pos=False, item_show_func=lambda _: train_line(self._info))
                self._bar.__enter__()
            self._bar.update(max(0, int(info.get("step", 0)) - self._bar.pos), info)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every:
            self._last_line = now
            click.echo(train_line(info), file=self.file)

    def close(self, output: dict[str, Any] | None) -> None:
        """Finish the bar (or write the last line) from the result's step count, if the task succeeded."""
        if output is not None:
            steps = output.get("steps", self._info.get("steps"))
            rate = (output.get("metrics") or {}).get("tokens_per_s", self._info.get("tokens_per_s"))
            final = {**self._info, "stage": "run", "step": steps, "steps": steps, "percent": 100.0, "eta_s": 0.0,
                     "loss": output.get("final_loss", self._info.get("loss")), "tokens_per_s": rate}
            self._last_line = -math.inf
            self._shown = None
            self.update(final)
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@click.command("train")
@_verify_options
@click.option("--model", required=True, help="The stored model to fine-tune.")
@click.option("--data", "data_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Training data: a .json file {\"texts\": [...], \"labels\": [...]} or a text file, one text a line.")
@click.option("--dataset", default=None, help="A data set in the store (`hypha-celery datasets add`).")
@click.option("--new-model", default=None, help="Id of the trained model (default: derived from the task id).")
@click.option("--method", type=click.Choice(["full", "lora"]), default=None, help="Train every weight or a LoRA adapter.")
@click.option("--lora-r", type=int, default=None, help="LoRA rank.")
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha.")
@click.option("--lora-dropout", type=float, default=None, help="LoRA dropout.")
@click.option("--target-module", "target_modules", multiple=True, help="A module LoRA adapts (repeatable).")
@click.option("--merge", is_flag=True, default=None, help="LoRA: store the merged full model instead of the adapter.")
@click.option("--epochs", type=int, default=None)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (instead of --epochs).")
@click.option("--lr", type=float, default=None, help="Learning rate.")
@click.option("--batch-size", type=int, default=None)
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step.")
@click.option("--warmup-steps", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--max-length", type=int, default=None, help="Tokens per text (longer texts are cut).")
@click.option("--cpu-cores", type=float, default=None, help="Cores to reserve (default: the worker's default).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@_KEY
@_PIN
@_BROKER
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="Seconds to wait for the answer.")
def run_train(model: str, data_file: str | None, dataset: str | None, new_model: str | None, method: str | None,
              lora_r: int | None, lora_alpha: float | None, lora_dropout: float | None, target_modules: tuple[str, ...],
              merge: bool | None, epochs: int | None, max_steps: int | None, lr: float | None, batch_size: int | None,
              grad_accum: int | None, warmup_steps: int | None, seed: int | None, max_length: int | None,
              cpu_cores: float | None, as_json: bool, key: str | None, model_sha256: str | None, broker: str | None,
              timeout: float) -> None:
    """Fine-tune MODEL, drawing its progress on stderr, then print the new model's id and the final loss."""
    kwargs: dict[str, Any] = {"data": _train_data(data_file, dataset)}
    lora: dict[str, Any] = {name: value for name, value in (("r", lora_r), ("alpha", lora_alpha), ("dropout", lora_dropout))
            if value is not None}
    if target_modules:
        lora["target_modules"] = list(target_modules)
    options: dict[str, Any] = {"new_model": new_model, "method": method, "merge": merge, "epochs": epochs, "max_steps": max_steps,
               "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum, "warmup_steps": warmup_steps,
               "seed": seed, "max_length": max_length, "lora": lora or None,
               "requirements": None if cpu_cores is None else {"cpu_cores": cpu_cores}}
    kwargs.update({name: value for name, value in options.items() if value is not None})
    async_result = _submit("hypha.train", broker, key, model_sha256, model=model, **kwargs)
    progress = TrainProgress(sys.stderr)
    deadline = time.monotonic() + timeout
    output: dict[str, Any] | None = None
    try:
        while not async_result.ready() and time.monotonic() < deadline:
            info = async_result.info if async_result.state == "PROGRESS" else None
            if isinstance(info, dict):
                progress.update(info)
            time.sleep(0.1)
        output = _result(async_result, max(1.0, deadline - time.monotonic()))["output"]
    finally:
        progress.close(output)
    if as_json:
        click.echo(json.dumps(output, indent=2, sort_keys=True))
        return
    metrics = output.get("metrics", {})
    for name, value in (("model_id", output["model_id"]), ("final_loss", round(output["final_loss"], 6)),
                        ("steps", output.get("steps")), ("epochs", output.get("epochs")),
                        ("trained_tokens", output.get("trained_tokens")), ("train_s", metrics.get("train_s")),
                        ("tokens_per_s", metrics.get("tokens_per_s")),
                        ("train_accuracy", metrics.get("train_accuracy"))):
        if value is not None:
            click.echo(f"{name}: {value}")


@click.command("diloco")
@click.option("--model", required=True, help="The starting model id (a causal LM or text classifier).")
@click.option("--shard", "shard_files", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help='A JSON file holding one shard ({"texts": [...]}); repeatable: each round trains one per live worker, '
                   'round-robin.')
@click.option("--shard-ref", "shard_refs", multiple=True, help="A stored data set id as a shard (repeatable).")
@click.option("--rounds", type=click.IntRange(1), required=True, help="Outer rounds.")
@click.option("--inner-steps", type=click.IntRange(1), default=None,
              help="Optimizer steps per worker per round (with --inner-seconds: a cap).")
@click.option("--inner-seconds", type=click.FloatRange(0.0, 86400.0, min_open=True), default=None,
              help="A time box per inner task: each worker trains as many steps as fit (instead of --inner-steps).")
@click.option("--compression", type=click.Choice(["none", "bf16", "int8"]), default="none", show_default=True,
              help="How workers send their pseudo-gradients (int8: per-block scales, with error feedback).")
@click.option("--outer-lr", type=float, default=0.7, show_default=True)
@click.option("--outer-momentum", type=float, default=0.9, show_default=True)
@click.option("--min-workers", type=click.IntRange(1), default=None,
              help="Deltas a round needs (default: every inner task the round sends, one per live worker).")
@click.option("--round-timeout", type=float, default=600.0, show_default=True, help="Seconds a round waits for deltas.")
@click.option("--lr", type=float, default=None, help="Inner AdamW learning rate (default: hypha.train's).")
@click.option("--batch-size", type=int, default=None)
@click.option("--max-length", type=int, default=None)
@click.option("--cpu-cores", type=float, default=1.0, show_default=True, help="Cores each inner task reserves.")
@click.option("--aggregator", type=click.Choice(["mean", "trimmed_mean", "median"]), default="mean", show_default=True,
              help="How the outer step combines the deltas (mean: weighted by shard size; the others coordinate-wise).")
@click.option("--trim", type=click.FloatRange(0.0, 0.5, max_open=True), default=None,
              help="trimmed_mean: the fraction dropped at each end of every coordinate (default 0.2).")
@click.option("--lora-r", type=click.IntRange(1, 256), default=None,
              help="Train a LoRA adapter of this rank instead of the full weights (each version is an adapter).")
@click.option("--memory", "outer_memory", default=None,
              help="The outer step's memory reservation, its executor's cap (e.g. 2GiB; default 512MiB).")
@_KEY
@_BROKER
@_TIMEOUT
def run_diloco(model: str, shard_files: tuple[str, ...], shard_refs: tuple[str, ...], rounds: int, inner_steps: int | None,
               inner_seconds: float | None, compression: str, outer_lr: float, outer_momentum: float,
               min_workers: int | None, round_timeout: float,
               lr: float | None, batch_size: int | None, max_length: int | None, cpu_cores: float, aggregator: str,
               trim: float | None, lora_r: int | None, outer_memory: str | None, key: str | None, broker: str | None,
               timeout: float) -> None:
    """Train MODEL with DiLoCo across workers, a progress bar per round; prints the final model and each round."""
    from hypha_celery.training import diloco

    shards: list[dict[str, Any]] = [{"ref": ref} for ref in shard_refs]
    for path in shard_files:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "texts" not in data:
            raise click.BadParameter(f'{path}: a shard file holds {{"texts": [...]}}', param_hint="--shard")
        shards.append(data)
    if not shards:
        raise click.UsageError("give at least one --shard or --shard-ref")
    if inner_steps is None and inner_seconds is None:
        raise click.UsageError("give --inner-steps or --inner-seconds")
    given = (("lr", lr), ("batch_size", batch_size), ("max_length", max_length))
    extra: dict[str, Any] = {name: value for name, value in given if value is not None}
    if lora_r is not None:
        extra.update(method="lora", lora={"r": lora_r})
    if outer_memory is not None:
        extra["aggregate_requirements"] = {"cpu_cores": 0.5, "memory": outer_memory}
    options = _submission(broker, key, None)
    options.pop("model_sha256")
    try:
        job = diloco(model, shards, rounds, inner_steps, inner_seconds=inner_seconds, compression=compression,
                     outer_lr=outer_lr, outer_momentum=outer_momentum,
                     min_workers=min_workers, requirements={"cpu_cores": cpu_cores}, round_timeout=round_timeout,
                     aggregator=aggregator, trim=trim, **options, **extra)
    except (HyphaError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _follow(job, timeout)


def _follow(job: Any, timeout: float) -> None:
    """One progress bar per round (inner tasks finished), then the round's lines (bytes moved, each worker's steps and
    seconds, refusals: :func:`~hypha_celery.training.distributed.rounds.describe_round`), then the result as JSON."""
    from hypha_celery.training.distributed.rounds import describe_round

    deadline = time.monotonic() + timeout
    shown_round, shown, printed, workers = 0, 0, 0, 0
    bar: Any = None
    while time.monotonic() < deadline:
        progress = job.progress()
        for entry in progress["history"][printed:]:
            if bar is not None:
                bar.update(workers - shown)
                bar.render_finish()
                bar = None
            for line in describe_round(entry):
                click.echo(line, err=True)
            printed += 1
        if progress["stage"] in ("done", "failed"):
            break
        if progress["round"] != shown_round and progress["stage"] == "inner" and progress.get("tasks"):
            shown_round, shown, workers = progress["round"], 0, max(1, int(progress.get("workers") or 1))
            bar = click.progressbar(length=workers, label=f"round {shown_round}/{progress['rounds']}", file=sys.stderr)
            bar.render_progress()
        if bar is not None and progress["finished"] > shown:
            bar.update(progress["finished"] - shown)
            shown = progress["finished"]
        time.sleep(0.2)
    try:
        result = job.wait(timeout=max(0.0, deadline - time.monotonic()))
    except (HyphaError, TimeoutError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    click.echo(json.dumps(result, indent=2))
