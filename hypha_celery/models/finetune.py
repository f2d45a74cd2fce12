"""Fine-tuning stored transformers models: full or LoRA (peft), for ``hypha.train``.

Used inside job executors only (:mod:`hypha_celery.executor.child`); importing
this module imports torch, and peft is imported when a LoRA run starts. The
model loads through :mod:`.transformers_runtime` (the same safe loading as for
serving: allow-listed class, safetensors only, no remote code), in float32.

Data: ``{"texts": [...]}`` trains a causal LM (next-token loss; padding is
ignored: its labels are -100); ``{"texts": [...], "labels": [...]}`` trains a
text classifier (labels as names from ``id2label`` or class ids). Texts are
truncated to ``max_length`` tokens and padded per batch.

The loop is plain torch: AdamW over the trainable parameters, a linear warmup
over ``warmup_steps`` then a linear decay to zero, ``grad_accum`` micro-batches
per optimizer step, a seeded shuffle per epoch. ``Progress`` goes out at most
every ``progress_interval`` seconds with the step, loss, tokens/s and ETA. With
``checkpoint_every`` (and a task id) the loop writes a checkpoint every that many
steps and, at start, resumes from one the task left (:mod:`.checkpoint`).

:func:`save` writes the result into a folder the store then takes in: a full
model in Hugging Face layout (``save_pretrained``: config.json and
model.safetensors, plus the base's tokenizer files) for ``ModelStore.import_hf``,
or peft's ``adapter_config.json`` + ``adapter_model.safetensors`` for
``ModelStore.save_adapter``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hypha_celery.errors import InvalidInput, UnsupportedModel
from hypha_celery.formats.huggingface import LORA_TARGET_MODULES, TEXT_CLASSIFICATION, TEXT_GENERATION
from hypha_celery.manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG, SAFETENSORS_SINGLE, Manifest
from hypha_celery.models.checkpoint import Checkpoints, Identity, Position, data_fingerprint
from hypha_celery.models.store import ModelStore
from hypha_celery.models.tensors import MAX_TRAIN_LENGTH, resolve_labels
from hypha_celery.models.text_inputs import check_texts
from hypha_celery.runtimes.transformers_loading import TransformerModel, load
from hypha_celery.work import Progress, Train, Trained

__all__ = ["MAX_CURVE_POINTS", "Finetuned", "finetune", "save"]

MAX_CURVE_POINTS = 1000
IGNORE_INDEX = -100  # torch's cross-entropy ignores these labels: padding
# Files of the base copied beside a fully trained model (save_pretrained writes config and weights itself).
_WEIGHT_FILES = (CONFIG, SAFETENSORS_SINGLE, "model.safetensors.index.json")


@dataclass
class Finetuned:
    """What :func:`finetune` leaves: the trained module (peft-wrapped for LoRA) and its report."""

    model: TransformerModel
    module: Any
    trained: Trained
    method: str
    load_s: float = 0.0


def finetune(store: ModelStore, request: Train, data: dict[str, Any], device: str,
             progress: Callable[[Progress], None], *, max_text_bytes: int | None = None) -> Finetuned:
    """Load ``request.model`` in float32 and train it on ``data`` as ``request`` says.

    ``max_text_bytes``: the worker's bound on a training text's bytes (None: from the model's maximum length).
    """
    manifest = store.manifest(request.model)
    if manifest.adapter_of is not None:
        raise UnsupportedModel(f"model {request.model!r} is a LoRA adapter: train its base "
                               f"{manifest.adapter_of.id!r} instead")
    if manifest.task not in (TEXT_GENERATION, TEXT_CLASSIFICATION):
        raise UnsupportedModel(f"model {request.model!r} ({manifest.task}): hypha.train fine-tunes text-generation "
                               "and text-classification models")
    torch.manual_seed(request.seed)
    random.seed(request.seed)
    started = time.perf_counter()
    loaded, _ = load(store, request.model, device, dtype="float32")
    loaded.max_text_bytes = max_text_bytes
    load_s = time.perf_counter() - started
    if loaded.multi_label or (loaded.task == TEXT_CLASSIFICATION and len(loaded.labels or []) < 2):
        raise UnsupportedModel(f"model {request.model!r}: hypha.train fine-tunes single-label classifiers (one label "
                               "per text, two classes or more); this one is multi-label or a regressor")
    texts, labels = _examples(loaded, data)
    module = loaded.module
    if request.method == "lora":
        module = _with_lora(loaded, request.lora or {})
    else:
        module.requires_grad_(True)
    max_length = min(request.max_length or MAX_TRAIN_LENGTH, loaded.max_length or MAX_TRAIN_LENGTH)
    checkpoints = _checkpoints(store, request, texts, labels, max_length)
    trained = _loop(loaded, module, texts, labels, request, max_length, progress, checkpoints)
    if checkpoints is not None:
        trained = dataclasses.replace(trained, resumed_from_step=checkpoints.resumed_from_step,
                                      checkpoint_refused=checkpoints.refused)
    return Finetuned(model=loaded, module=module, trained=trained, method=request.method, load_s=load_s)


def _checkpoints(store: ModelStore, request: Train, texts: list[str], labels: list[int] | None,
                 max_length: int) -> Checkpoints | None:
    """The task's checkpoints, when it asked for them: who the run is, for checking one found at start."""
    if not request.checkpoint_every or request.task_id is None:
        return None
    settings = {"model": request.model, "method": request.method, "lora": request.lora, "lr": request.lr,
                "batch_size": request.batch_size, "grad_accum": request.grad_accum, "epochs": request.epochs,
                "max_steps": request.max_steps, "warmup_steps": request.warmup_steps, "seed": request.seed,
                "max_length": max_length}
    identity = Identity(model_sha256=store.manifest_sha256(request.model),
                        data_sha256=data_fingerprint(texts, labels), settings=settings)
    return Checkpoints(store.root, request.task_id, request.checkpoint_every, identity)


def _examples(model: TransformerModel, data: dict[str, Any]) -> tuple[list[str], list[int] | None]:
    texts = data.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise InvalidInput("data.texts must be a non-empty list of non-empty strings")
    check_texts(texts, "data.texts", model.text_bound())  # a stored data set's too, before the tokenizer
    if model.task == TEXT_GENERATION:
        if "labels" in data:
            raise InvalidInput(f"model {model.manifest.id!r} is a causal LM: data takes texts only, no labels")
        return list(texts), None
    raw = data.get("labels")
    if not isinstance(raw, list) or len(raw) != len(texts):
        raise InvalidInput(f"data.labels must be a list with one label per text ({len(texts)}) for a classifier")
    return list(texts), resolve_labels(raw, model.labels or [])


def _with_lora(model: TransformerModel, settings: dict[str, Any]) -> Any:
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise UnsupportedModel("method 'lora' needs peft: install hypha-celery[hf]") from None

    targets = settings.get("target_modules") or LORA_TARGET_MODULES.get(model.manifest.model_type or "")
    if not targets:
        raise InvalidInput(f"lora.target_modules is required for model_type {model.manifest.model_type!r}")
    config = LoraConfig(
        r=settings.get("r", 8), lora_alpha=settings.get("alpha", 16), lora_dropout=settings.get("dropout", 0.0),
        target_modules=list(targets),
        task_type=TaskType.CAUSAL_LM if model.task == TEXT_GENERATION else TaskType.SEQ_CLS,
    )
    try:
        with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated alias; nothing for a user to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model.module, config)
    except ValueError as exc:  # a target module the model lacks
        raise InvalidInput(f"lora: {exc}") from None


def _batch(model: TransformerModel, texts: list[str], labels: list[int] | None, max_length: int
           ) -> tuple[dict[str, torch.Tensor], int]:
    encoded = model.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    inputs = {key: value.to(model.device) for key, value in encoded.items()
              if key in ("input_ids", "attention_mask", "token_type_ids")}
    mask = inputs["attention_mask"]
    if labels is None:
        inputs["labels"] = inputs["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
    else:
        inputs["labels"] = torch.tensor(labels, dtype=torch.int64, device=model.device)
    return inputs, int(mask.sum())


def _loop(model: TransformerModel, module: Any, texts: list[str], labels: list[int] | None, request: Train,
          max_length: int, progress: Callable[[Progress], None], checkpoints: Checkpoints | None = None) -> Trained:
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
    for epoch in range(1 if resumed is None else resumed.epoch, epochs + 1):
        order_state = generator.getstate()
        order = list(range(rows))
        generator.shuffle(order)
        micro = [order[at:at + batch_size] for at in range(0, rows, batch_size)]
        skip = resumed.position if resumed is not None and epoch == resumed.epoch else 0
        for first in range(skip, len(micro), accum):
            if step >= total:
                break
            group = micro[first:first + accum]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for index in group:
                inputs, count = _batch(model, [texts[i] for i in index], None if labels is None else
                                       [labels[i] for i in index], max_length)
                loss = module(**inputs).loss
                (loss / len(group)).backward()
                step_loss += float(loss.detach()) / len(group)
                tokens += count
            optimizer.step()
            schedule.step()
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
            inputs, _ = _batch(model, texts[at:at + batch_size], labels[at:at + batch_size], max_length)
            predicted = module(**{k: v for k, v in inputs.items() if k != "labels"}).logits.argmax(-1)
            right += int((predicted == inputs["labels"]).sum())
    return right / len(texts)


def _sample(curve: list[float]) -> list[float]:
    stride = max(1, math.ceil(len(curve) / MAX_CURVE_POINTS))
    sampled = curve[::stride]
    if sampled[-1] != curve[-1]:
        sampled.append(curve[-1])
    return sampled


def save(done: Finetuned, store: ModelStore, out: Path, *, merge: bool) -> str:
    """Write the result into the empty folder ``out``; returns ``"adapter"`` or ``"model"`` (what ``out`` holds).

    Safetensors only. An adapter folder holds exactly peft's two files; a model folder
    holds ``save_pretrained``'s config.json and weights plus the base's other files
    (tokenizer, generation config, sentence-transformers settings).
    """
    module = done.module
    if done.method == "lora" and not merge:
        module.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = done.model.manifest.id  # a store id: nothing loads by it
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for entry in out.iterdir():  # peft's model card and anything else: not part of the entry
            if entry.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return "adapter"
    if done.method == "lora":
        module = module.merge_and_unload()
    module.save_pretrained(str(out), safe_serialization=True)
    _copy_base_files(done.model.manifest, store, out)
    return "model"


def _copy_base_files(manifest: Manifest, store: ModelStore, out: Path) -> None:
    base = store.path(manifest.id)
    for name in manifest.files:
        if name in _WEIGHT_FILES or name.startswith("model-") or (out / name).exists():
            continue
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / name, target)
