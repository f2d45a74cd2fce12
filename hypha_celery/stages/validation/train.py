"""``hypha.train``'s arguments: a built-in model on ``inputs``/``targets``, or a transformers model on ``texts``.

A transformers model (a causal LM or a text classifier, with ``labels``) trains full or LoRA; its own arguments
(:data:`FINETUNE`, read into :class:`FinetuneParams` by :func:`finetune_params`) apply to it only. A ``new_model``
id that is taken is refused, except by a model this same task id saved: that is a copy of a finished task
(redelivered after its result could not be stored, or after kill -9), which answers from what the first run
recorded (:func:`finished_training`).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import InvalidInput, InvalidTask, UnsupportedModel
from hypha_celery.manifest import Manifest, validate_model_id
from hypha_celery.models.store import ModelStore
from hypha_celery.models.tensors import MAX_TRAIN_LENGTH, check_inputs, resolve_labels
from hypha_celery.models.text_inputs import TextBound, check_texts
from hypha_celery.resources.requirements import Requirements
from hypha_celery.stages.validation.arguments import Arg, TaskArgs, check_arguments, check_value, check_values
from hypha_celery.stages.validation.common import MAX_TEXT_CHARS, MODEL, REQUIREMENTS, local_manifest, requirements_for
from hypha_celery.work import Trained

__all__ = [
    "FINETUNE",
    "LORA_LR",
    "LORA_MIN_STEPS",
    "MAX_TRAIN_TEXTS",
    "FinetuneParams",
    "TrainSpec",
    "check_training_texts",
    "finetune_params",
    "finished_training",
    "lora_default_steps",
    "validate_train",
]

# Texts inline per task (tokens per text are capped by max_length, further by the model's).
MAX_TRAIN_TEXTS = 100_000
# LoRA's defaults, chosen so that the README's example visibly changes the model: its B matrices start at
# zero, so a few texts at 2e-4 for one epoch (one or two steps) left the adapter's text equal to the base's.
LORA_LR = 1e-3
LORA_MIN_STEPS = 20
_TRAINABLE_TASKS = ("text-generation", "text-classification")
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.]{1,128}\Z")

LORA = Arg("lora", "object", fields=(
    Arg("r", "int", 1, 1024, default=8),
    Arg("alpha", "number", 0, 100_000, low_open=True),  # absent: 2r
    Arg("dropout", "number", 0, 1, high_open=True, default=0.0),
    Arg("target_modules", "list", 1, 64, items=Arg("", "str", pattern=_MODULE_NAME, note=" (a module name: letters, "
                                                     "digits, '_', '.')")),
))
# The transformers-only arguments; their defaults are FinetuneParams'.
FINETUNE = (
    Arg("method", choices=("full", "lora"), default="full"),
    LORA,
    Arg("merge", "bool", default=False),
    Arg("max_steps", "int", 1, 10_000_000, nullable=True),
    Arg("grad_accum", "int", 1, 1024, default=1),
    Arg("warmup_steps", "int", 0, 10_000_000, default=0),
    Arg("seed", "int", 0, 2**63 - 1, default=0),
    Arg("max_length", "int", 1, MAX_TRAIN_LENGTH, default=MAX_TRAIN_LENGTH),
    Arg("checkpoint_every", "int", 1, 10_000_000, nullable=True, note=" (optimizer steps between checkpoints)"),
)
_FINETUNE_NAMES = frozenset(arg.name for arg in FINETUNE)
# epochs and lr default by the model's kind (built-in or transformers, full or LoRA): None here.
ARGS = TaskArgs("hypha.train", (
    MODEL, Arg("data", required=True), REQUIREMENTS, Arg("new_model"),
    Arg("epochs", "int", 1, 1_000_000),
    Arg("lr", "number", 0, 10, low_open=True),
    Arg("batch_size", "int", 1, 65_536),
    *FINETUNE,
))


@dataclass(frozen=True)
class FinetuneParams:
    """``hypha.train``'s arguments for a transformers model, checked (the executor's ``Train`` fields)."""

    method: str = "full"  # or "lora"
    lora: dict[str, Any] | None = None  # r, alpha, dropout and (when given) target_modules
    merge: bool = False
    max_steps: int | None = None
    grad_accum: int = 1
    warmup_steps: int = 0
    seed: int = 0
    max_length: int = 2048
    checkpoint_every: int | None = None  # optimizer steps between checkpoints (models.checkpoint)
    # Set by a DiLoCo inner task only (never a hypha.train argument): its time box, and the test hook's delay.
    max_seconds: float | None = None
    step_delay_s: float = 0.0
    adapter: str | None = None  # a LoRA DiLoCo round: the job's current global adapter, continued

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainSpec:
    model: str
    data: dict[str, Any]
    epochs: int
    lr: float
    batch_size: int
    new_model: str
    requirements: Requirements
    manifest: Manifest | None
    # Set on a copy of a task that already saved ``new_model`` (a redelivery after the result could not be
    # stored, or after kill -9): what that run reported. The copy answers from it and trains nothing.
    finished: Trained | None = None
    finetune: FinetuneParams | None = None  # set for a transformers model


def lora_default_steps(texts: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps of a LoRA run given neither ``epochs`` nor ``max_steps``: one epoch, at least 20."""
    return max(LORA_MIN_STEPS, math.ceil(math.ceil(texts / batch_size) / grad_accum))


def validate_train(
    cfg: WorkerConfig, store: ModelStore, args: Sequence[Any], kwargs: Mapping[str, Any], task_id: str
) -> TrainSpec:
    """A ``hypha.train`` task: a built-in model on rows, or a transformers model on texts (:class:`FinetuneParams`)."""
    values = check_arguments(ARGS, args, kwargs)
    model = validate_model_id(kwargs["model"])
    requirements = requirements_for(cfg, kwargs.get("requirements"), sizable=True)
    data = kwargs["data"]
    kind = _train_data_kind(data)
    manifest = local_manifest(store, model)
    known = manifest if manifest is not None or kind == "rows" else store.peek(model)
    transformers = known.runtime == "transformers" if known is not None else kind == "texts"
    if transformers:
        if kind == "rows":
            raise InvalidTask(f"model {model!r} is a transformers model: data takes texts ({{'texts': [...]}}, with "
                              "'labels' for a classifier), not inputs and targets")
        finetune = finetune_params(kwargs, known)
    else:
        if kind == "texts":
            raise InvalidTask(f"model {model!r} is a built-in model: data takes inputs and targets, not texts")
        given = sorted(set(kwargs) & _FINETUNE_NAMES)
        if given:
            raise InvalidTask(f"{given[0]} applies to transformers models; model {model!r} is a built-in model")
        if requirements.auto:
            raise InvalidTask(f"requirements.{sorted(requirements.auto)[0]} 'auto' is sized from a transformers "
                              "model's manifest; give training a built-in model a size")
        finetune = None
    epochs = values["epochs"] or (10 if finetune is None else 1)
    if finetune is not None and finetune.max_steps is not None and "epochs" in kwargs:
        raise InvalidTask("hypha.train takes epochs or max_steps, not both")
    batch_size = values["batch_size"] or (32 if finetune is None else 8)
    default_lr = 1e-3 if finetune is None else (LORA_LR if finetune.method == "lora" else 5e-5)
    if finetune is not None and finetune.method == "lora" and finetune.max_steps is None and "epochs" not in kwargs \
            and isinstance(data.get("texts"), list):
        finetune = replace(finetune, max_steps=lora_default_steps(len(data["texts"]), batch_size, finetune.grad_accum))
    lr = values["lr"] if values["lr"] is not None else default_lr
    new_model = validate_model_id(kwargs.get("new_model") or f"{model}-ft-{task_id.replace('-', '')[:12]}")
    finished = None
    if store.taken(new_model):
        finished = finished_training(store, new_model, task_id)
        if finished is None:
            store.refuse_taken(new_model, InvalidTask, "new_model ")
    max_bytes = cfg.security.max_input_bytes
    if kind == "ref":
        ref = validate_model_id(data["ref"])
        if not store.has(ref, dataset=True) and not store.sources:
            raise UnsupportedModel(f"data set {ref!r} is not in this worker's store and no sources are configured")
    elif kind == "texts":
        _check_training_texts(data, known, max_bytes, cfg.security.max_text_bytes)
    elif manifest is not None:
        batch = check_inputs(data["inputs"], manifest.input_shape, max_bytes=max_bytes, model=model)
        targets = data["targets"]
        if not isinstance(targets, list) or len(targets) != batch.rows:
            raise InvalidInput(f"data.targets must be a list of {batch.rows} targets, one per input row")
    return TrainSpec(model=model, data=dict(data), epochs=epochs, lr=float(lr), batch_size=batch_size,
                     new_model=new_model, requirements=requirements, manifest=manifest, finished=finished,
                     finetune=finetune)


def _train_data_kind(data: Any) -> str:
    """``ref`` (a stored data set), ``rows`` (inputs and targets: built-in models) or ``texts`` (transformers)."""
    keys = set(data) if isinstance(data, Mapping) else None
    if keys == {"ref"}:
        return "ref"
    if keys == {"inputs", "targets"}:
        return "rows"
    if keys in ({"texts"}, {"texts", "labels"}):
        return "texts"
    raise InvalidTask("data must be {'inputs': [...], 'targets': [...]} (a built-in model), {'texts': [...]} (a causal "
                      "LM), {'texts': [...], 'labels': [...]} (a text classifier) or {'ref': '<data set id>'}")


def finetune_params(kwargs: Mapping[str, Any], manifest: Manifest | None) -> FinetuneParams:
    """The transformers-only arguments of ``hypha.train`` (:data:`FINETUNE`) in ``kwargs``, each checked by name
    (``InvalidTask``), and held to the model (``manifest``: its task, its max_length), when it is known."""
    if manifest is not None:
        if manifest.adapter_of is not None:
            raise InvalidTask(f"model {manifest.id!r} is a LoRA adapter of {manifest.adapter_of.id!r}: train the base "
                              "model")
        if manifest.task not in _TRAINABLE_TASKS:
            raise InvalidTask(f"model {manifest.id!r} ({manifest.task}): hypha.train fine-tunes "
                              f"{' and '.join(_TRAINABLE_TASKS)} models")
    if importlib.util.find_spec("transformers") is None:  # finds it without importing it
        raise UnsupportedModel(f"model {kwargs['model']!r} is a transformers model; this worker lacks the [hf] extra")
    values = check_values(FINETUNE, kwargs)
    method, merge = values["method"], values["merge"]
    if method == "full" and ("lora" in kwargs or merge):
        raise InvalidTask(f"{'lora' if 'lora' in kwargs else 'merge'} applies to method 'lora' only")
    lora = None
    if method == "lora":
        settings = values["lora"] if values["lora"] is not None else check_value(LORA, {})
        lora = {"r": settings["r"], "alpha": settings.get("alpha", 2 * settings["r"]),
                "dropout": float(settings["dropout"]),
                **({"target_modules": settings["target_modules"]} if "target_modules" in settings else {})}
        if importlib.util.find_spec("peft") is None:
            raise UnsupportedModel("method 'lora' needs peft; this worker lacks it (install hypha-celery[hf])")
    max_length = values["max_length"]
    if manifest is not None and manifest.max_length:
        max_length = min(max_length, manifest.max_length)  # the model's own limit caps it
    return FinetuneParams(method=method, lora=lora, merge=merge, max_steps=values["max_steps"],
                          grad_accum=values["grad_accum"], warmup_steps=values["warmup_steps"], seed=values["seed"],
                          max_length=max_length, checkpoint_every=values["checkpoint_every"])


def _check_training_texts(data: Mapping[str, Any], manifest: Manifest | None, max_bytes: int,
                          max_text_bytes: int | None) -> None:
    texts = data["texts"]
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) and text for text in texts):
        raise InvalidInput("data.texts must be a non-empty list of non-empty strings")
    if len(texts) > MAX_TRAIN_TEXTS:
        raise InvalidInput(f"data.texts holds {len(texts)} texts; at most {MAX_TRAIN_TEXTS} inline (store more as a "
                           "data set)")
    longest = max(len(text) for text in texts)
    if longest > MAX_TEXT_CHARS:
        raise InvalidInput(f"a text has {longest} characters; at most {MAX_TEXT_CHARS}")
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    if size > max_bytes:
        raise InvalidInput(f"data.texts are {size} bytes, above max_input_bytes ({max_bytes})")
    check_training_texts(texts, manifest, max_text_bytes)
    labels = data.get("labels")
    if manifest is None:
        return
    if manifest.task == "text-generation" and labels is not None:
        raise InvalidTask(f"model {manifest.id!r} is a causal LM: data takes texts only, no labels")
    if manifest.task == "text-classification":
        if not isinstance(labels, list) or len(labels) != len(texts):
            raise InvalidInput(f"data.labels must be a list with one label per text ({len(texts)}) for a classifier")
        resolve_labels(labels, manifest.labels or [])


def check_training_texts(texts: list[str], manifest: Manifest | None, max_text_bytes: int | None) -> None:
    """Each inline training text valid Unicode within the model's byte bound (the worker-wide one while the model
    is not read yet: checked again under the lease, once fetched)."""
    bound = TextBound.of(manifest.id if manifest else None, manifest.max_length if manifest else None, max_text_bytes)
    check_texts(texts, "data.texts", bound)


def finished_training(store: ModelStore, new_model: str, task_id: str) -> Trained | None:
    """What training reported, when the stored ``new_model`` was saved by task ``task_id`` itself; else None.

    The record is written with the model in one ``rename`` (``ModelStore.add(..., produced_by=...)``), so a
    model without it, or saved by another task id, stays what it was: an id already taken.
    """
    record = store.produced_by(new_model)
    if record is None or record.get("task_id") != task_id:
        return None
    try:
        return Trained.from_json(record.get("trained"))
    except (TypeError, ValueError):
        return None
