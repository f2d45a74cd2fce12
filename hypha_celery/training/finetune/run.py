"""Fine-tuning stored transformers models, full or LoRA (peft), for ``hypha.train``: the entry point.

Used inside job executors only (:mod:`hypha_celery.executor.child`); importing this module imports
torch, and peft is imported when a LoRA run starts. The model loads through
:mod:`hypha_celery.runtimes.transformers_loading` (the same safe loading as for serving: allow-listed
class, safetensors only, no remote code), in float32. :func:`finetune` checks the model, loads it,
checks the data (:mod:`.data`), wraps LoRA (:mod:`.lora`), sets up the task's checkpoints
(:mod:`hypha_celery.training.checkpoints.local`) and runs the loop (:mod:`.loop`);
:func:`hypha_celery.training.finetune.save.save` writes the result.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.huggingface import TEXT_CLASSIFICATION, TEXT_GENERATION
from hypha_celery.models.store import Entry, ModelStore
from hypha_celery.models.tensors import MAX_TRAIN_LENGTH
from hypha_celery.runtimes.transformers_loading import TransformerModel, load
from hypha_celery.training.checkpoints.local import Identity, TaskCheckpoints, data_fingerprint
from hypha_celery.training.finetune.data import examples
from hypha_celery.training.finetune.loop import loop
from hypha_celery.training.finetune.lora import continue_lora, with_lora
from hypha_celery.work import Progress, Train, Trained

__all__ = ["Finetuned", "finetune"]


@dataclass
class Finetuned:
    """What :func:`finetune` leaves: the trained module (peft-wrapped for LoRA) and its report."""

    model: TransformerModel
    entry: Entry  # the stored model it was loaded from, verified once: the saved result's base files and its pin
    module: Any
    trained: Trained
    method: str
    load_s: float = 0.0


def finetune(store: ModelStore, request: Train, data: dict[str, Any], device: str,
             progress: Callable[[Progress], None], *, max_text_bytes: int | None = None,
             entry: Entry | None = None) -> Finetuned:
    """Load ``request.model`` in float32 and train it on ``data`` as ``request`` says.

    ``max_text_bytes``: the worker's bound on a training text's bytes (None: from the model's maximum length).
    ``entry``: ``request.model``'s verified entry when the caller opened it already (else opened here, once).
    """
    entry = entry if entry is not None else store.open(request.model)
    manifest = entry.manifest
    if manifest.adapter_of is not None:
        raise UnsupportedModel(f"model {request.model!r} is a LoRA adapter: train its base "
                               f"{manifest.adapter_of.id!r} instead")
    if manifest.task not in (TEXT_GENERATION, TEXT_CLASSIFICATION):
        raise UnsupportedModel(f"model {request.model!r} ({manifest.task}): hypha.train fine-tunes text-generation "
                               "and text-classification models")
    torch.manual_seed(request.seed)
    random.seed(request.seed)
    started = time.perf_counter()
    loaded, _ = load(entry, device, dtype="float32")
    loaded.max_text_bytes = max_text_bytes
    load_s = time.perf_counter() - started
    if loaded.multi_label or (loaded.task == TEXT_CLASSIFICATION and len(loaded.labels or []) < 2):
        raise UnsupportedModel(f"model {request.model!r}: hypha.train fine-tunes single-label classifiers (one label "
                               "per text, two classes or more); this one is multi-label or a regressor")
    texts, labels = examples(loaded, data)
    module = loaded.module
    if request.method == "lora" and request.adapter is not None:
        module = continue_lora(loaded, entry, store.open(request.adapter))
    elif request.method == "lora":
        module = with_lora(loaded, request.lora or {})
    else:
        module.requires_grad_(True)
    max_length = min(request.max_length or MAX_TRAIN_LENGTH, loaded.max_length or MAX_TRAIN_LENGTH)
    checkpoints = _checkpoints(store, entry, request, texts, labels, max_length)
    trained = loop(loaded, module, texts, labels, request, max_length, progress, checkpoints)
    if checkpoints is not None:
        trained = dataclasses.replace(trained, resumed_from_step=checkpoints.resumed_from_step,
                                      checkpoint_refused=checkpoints.refused)
    return Finetuned(model=loaded, entry=entry, module=module, trained=trained, method=request.method, load_s=load_s)


def _checkpoints(store: ModelStore, entry: Entry, request: Train, texts: list[str], labels: list[int] | None,
                 max_length: int) -> TaskCheckpoints | None:
    """The task's checkpoints, when it asked for them: who the run is, for checking one found at start."""
    if not request.checkpoint_every or request.task_id is None:
        return None
    settings = {"model": request.model, "method": request.method, "lora": request.lora, "adapter": request.adapter,
                "lr": request.lr,
                "batch_size": request.batch_size, "grad_accum": request.grad_accum, "epochs": request.epochs,
                "max_steps": request.max_steps, "warmup_steps": request.warmup_steps, "seed": request.seed,
                "max_length": max_length}
    identity = Identity(model_sha256=entry.sha256,
                        data_sha256=data_fingerprint(texts, labels), settings=settings)
    return TaskCheckpoints(store.root, request.task_id, request.checkpoint_every, identity)
