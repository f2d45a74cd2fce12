"""The training loop of a fine-tune: plain torch, resumable from a checkpoint, reporting progress.

AdamW over the trainable parameters, a linear warmup over ``warmup_steps`` then a linear decay to
zero, ``grad_accum`` micro-batches per optimizer step, a seeded shuffle per epoch. ``Progress``
goes out at most every ``progress_interval`` seconds with the step, loss, tokens/s and ETA. With
checkpoints (:class:`~hypha_celery.training.checkpoints.local.TaskCheckpoints`) the loop writes one
every ``checkpoint_every`` steps and, at start, resumes from one the task left. With ``max_seconds`` (a DiLoCo
time box) the loop stops before a step that would end past it, at the mean step time so far (one step at least).
Apart from loading
and saving so that what a step does reads in one place.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch

from hypha_celery.runtimes.transformers_loading import TransformerModel
from hypha_celery.training.checkpoints.local import Position, TaskCheckpoints
from hypha_celery.training.finetune.data import batch
from hypha_celery.work import Progress, Train, Trained

__all__ = ["MAX_CURVE_POINTS", "loop"]

MAX_CURVE_POINTS = 1000


def loop(model: TransformerModel, module: Any, texts: list[str], labels: list[int] | None, request: Train,
          max_length: int, progress: Callable[[Progress], None], checkpoints: TaskCheckpoints | None = None) -> Trained:
    """Train ``module`` on ``texts`` as ``request`` says; what it learned, with the loss curve and metrics."""
    rows, batch_size, accum = len(texts), request.batch_size, max(1, request.grad_accum)
    micro_per_epoch = math.ceil(rows / batch_size)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / accum))
    total = request.max_steps or request.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    parameters = [p for _, p in named]
    optimizer = torch.optim.AdamW(parameters, lr=request.lr)
    warmup = request.warmup_steps

    def factor(step: int) -> float:  # of the step about to be taken (0-based)
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = random.Random(request.seed)
    curve: list[float] = []
    step = tokens = 0
    resumed = checkpoints.restore(named, optimizer, schedule) if checkpoints is not None else None
    if resumed is not None:
        generator.setstate(_rng_state(resumed.order_state))
        curve, step, tokens = list(resumed.curve), resumed.step, resumed.tokens
    steps_before, tokens_before = step, tokens  # a resumed run's rate and ETA count its own steps only
    saved: int | None = None  # the step of a checkpoint written since the last report
    started = last_report = time.monotonic()
    module.train(True)
    stopped = False
    for epoch in range(1 if resumed is None else resumed.epoch, epochs + 1):
        order_state = generator.getstate()
        order = list(range(rows))
        generator.shuffle(order)
        micro = [order[at:at + batch_size] for at in range(0, rows, batch_size)]
        skip = resumed.position if resumed is not None and epoch == resumed.epoch else 0
        for first in range(skip, len(micro), accum):
            if step >= total or _out_of_time(request.max_seconds, time.monotonic() - started, step - steps_before):
                stopped = True
                break
            group = micro[first:first + accum]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for index in group:
                inputs, count = batch(model, [texts[i] for i in index], None if labels is None else
                                       [labels[i] for i in index], max_length)
                loss = module(**inputs).loss
                (loss / len(group)).backward()
                step_loss += float(loss.detach()) / len(group)
                tokens += count
            optimizer.step()
            schedule.step()
            if request.step_delay_s:
                time.sleep(request.step_delay_s)
            step += 1
            curve.append(step_loss)
            if checkpoints is not None and checkpoints.due(step):
                checkpoints.save(Position(step=step, epoch=epoch, position=first + len(group), order_state=order_state,
                                          curve=curve, tokens=tokens), named, optimizer, schedule)
                saved = step  # told in the next report: the worker may copy it to shared storage
            now = time.monotonic()
            if now - last_report >= request.progress_interval:
                last_report = now
                progress(_progress(epoch, epochs, step, total, step_loss, tokens - tokens_before, now - started,
                                   steps_before, saved))
                saved = None
        if stopped:
            epochs = min(epochs, epoch)  # a time box ends the run in this epoch
            break
    module.train(False)
    elapsed = time.monotonic() - started
    progress(_progress(epochs, epochs, step, total, curve[-1], tokens - tokens_before, elapsed, steps_before, saved))
    tail = curve[-min(len(curve), steps_per_epoch):]  # the last epoch's steps (or all of them)
    rate = (tokens - tokens_before) / elapsed if elapsed else None  # this run's own tokens (not a checkpoint's)
    metrics: dict[str, Any] = {"train_s": round(elapsed, 3), "tokens_per_s": None if rate is None else round(rate, 1),
                               "trainable_parameters": sum(p.numel() for p in parameters), "max_length": max_length}
    if labels is not None:
        metrics["train_accuracy"] = _accuracy(model, module, texts, labels, batch_size, max_length)
    return Trained(final_loss=sum(tail) / len(tail), loss_curve=_sample(curve), epochs=epochs, steps=step,
                   samples=rows, trained_tokens=tokens, metrics=metrics)


def _out_of_time(limit: float | None, elapsed: float, steps: int) -> bool:
    """Whether one more step, at the mean step time so far, would end past ``limit`` seconds (never before a first)."""
    return limit is not None and steps > 0 and elapsed + elapsed / steps > limit


def _rng_state(saved: Any) -> tuple[Any, ...]:
    """``random.Random.getstate()`` back from its JSON form (lists for tuples)."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def _progress(epoch: int, epochs: int, step: int, total: int, loss: float, tokens: int, elapsed: float,
              first_step: int = 0, checkpoint_step: int | None = None) -> Progress:
    """``tokens`` and ``elapsed``: since ``first_step`` (0, or the step a run resumed at)."""
    rate = tokens / elapsed if elapsed > 0 else 0.0
    eta = elapsed / (step - first_step) * (total - step) if step > first_step else None
    return Progress(epoch=epoch, epochs=epochs, step=step, steps=total, loss=loss,
                    percent=round(100.0 * step / total, 2), tokens_per_s=round(rate, 1),
                    eta_s=None if eta is None else round(eta, 2), checkpoint_step=checkpoint_step)


def _accuracy(model: TransformerModel, module: Any, texts: list[str], labels: list[int], batch_size: int,
              max_length: int) -> float:
    """The trained classifier's accuracy on its training texts."""
    right = 0
    with torch.inference_mode():
        for at in range(0, len(texts), batch_size):
            inputs, _ = batch(model, texts[at:at + batch_size], labels[at:at + batch_size], max_length)
            predicted = module(**{k: v for k, v in inputs.items() if k != "labels"}).logits.argmax(-1)
            right += int((predicted == inputs["labels"]).sum())
    return right / len(texts)


def _sample(curve: list[float]) -> list[float]:
    stride = max(1, math.ceil(len(curve) / MAX_CURVE_POINTS))
    sampled = curve[::stride]
    if sampled[-1] != curve[-1]:
        sampled.append(curve[-1])
    return sampled
