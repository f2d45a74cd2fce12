"""Validate a task's keyword arguments before it may reserve anything.

Each task kind has one ``validate_*`` function returning a frozen spec, or
raising the named error a person can act on: ``InvalidTask`` (schema, types),
``InvalidInput`` (inputs), ``UnsupportedModel`` (model id), and the per-task
caps (``ExcessiveMemoryRequest``, ``InsufficientCpu``).

``hypha.infer`` takes exactly one of ``inputs`` (numbers, for the built-in
architectures), ``texts`` (embedding and text-classification models) or
``images`` (image classifiers). Texts and images are checked here, in the
worker, without torch, transformers or an image decoder: at most
:data:`MAX_TEXTS` texts of at most :data:`MAX_TEXT_CHARS` characters; at most
:data:`MAX_IMAGES` base64 PNG or JPEG images of at most
:data:`MAX_IMAGE_PIXELS` pixels each (read from the PNG/JPEG header); the
whole request within ``max_input_bytes``.

Every text (a prompt, a chat message, a text to embed or classify, a training
text, a stop string) must be Unicode scalar values (a lone surrogate is
``InvalidInput`` naming the argument and the character), and every text a
tokenizer will read must be within the model's byte bound
(:mod:`hypha_celery.models.text_inputs`), all before anything is reserved.

``hypha.generate`` takes ``prompt`` (a string) or ``messages`` (chat turns,
rendered with the model's chat template, so only for a model that has one)
and sampling settings, each checked for type and range here
(:class:`GenerateParams`); ``max_new_tokens`` is capped by ``[worker.generation]``.

``hypha.train`` trains a built-in model on ``inputs``/``targets``, or a transformers model (a
causal LM or a text classifier) on ``texts`` (with ``labels`` for a classifier), full or LoRA
(:func:`finetune_params`: each argument checked by name). It refuses a ``new_model`` id that is
taken, except by a model this same task id saved:
that is a copy of a finished task (redelivered after its result could not be stored, or after
kill -9), which answers from what the first run recorded (:func:`finished_training`).
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import InvalidInput, InvalidTask, ModelPinMismatch, UnsupportedModel
from hypha_celery.manifest import DATASET_MANIFEST, Manifest, validate_model_id
from hypha_celery.models.proofs import Proof, ProofFormatError
from hypha_celery.models.store import ModelStore
from hypha_celery.models.tensors import MAX_IMAGE_PIXELS, MAX_TRAIN_LENGTH, check_inputs, resolve_labels
from hypha_celery.models.text_inputs import TextBound, check_text, check_texts, unicode_error
from hypha_celery.protocol import Trained
from hypha_celery.resources.requirements import Requirements, check_caps

__all__ = [
    "LORA_LR",
    "LORA_MIN_STEPS",
    "MAX_IMAGES",
    "MAX_IMAGE_PIXELS",
    "MAX_TEXTS",
    "MAX_TEXT_CHARS",
    "MAX_TRAIN_LENGTH",
    "MAX_TRAIN_TEXTS",
    "FinetuneParams",
    "GenerateParams",
    "GenerateSpec",
    "InferSpec",
    "NoopSpec",
    "TrainSpec",
    "VerifySpec",
    "check_generate_model",
    "check_infer_payload",
    "check_model_pin",
    "check_prompt_bytes",
    "check_training_texts",
    "finetune_params",
    "finished_training",
    "image_size",
    "lora_default_steps",
    "resolve_labels",
    "validate_generate",
    "validate_infer",
    "validate_noop",
    "validate_train",
    "validate_verify",
]

# Per request. Texts past the model's max_length are truncated anyway: the character cap bounds tokenising.
MAX_TEXTS = 256
MAX_TEXT_CHARS = 32_768
MAX_IMAGES = 32
_INFER_KINDS = ("inputs", "texts", "images")
DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
_ROLES = ("system", "user", "assistant")
_TASK_FOR = {"feature-extraction": "hypha.infer", "text-classification": "hypha.infer",
             "image-classification": "hypha.infer"}
_TEXT_TASKS = ("feature-extraction", "text-classification")
_TRAIN_ARGS = frozenset({"model", "data", "epochs", "lr", "batch_size", "requirements", "new_model"})
_FINETUNE_ARGS = frozenset({"method", "lora", "merge", "max_steps", "grad_accum", "warmup_steps", "seed", "max_length",
                            "checkpoint_every"})
_TRAINABLE_TASKS = ("text-generation", "text-classification")
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.]{1,128}\Z")
# hypha.train on a transformers model: texts inline per task, and tokens per text (further capped by the model's).
MAX_TRAIN_TEXTS = 100_000


@dataclass(frozen=True)
class InferSpec:
    """``inputs`` is what the executor gets: a built-in model's rows, or ``{"texts": [...]}`` / ``{"images": [...]}``."""

    model: str
    inputs: Any
    requirements: Requirements
    manifest: Manifest | None
    kind: str = "inputs"  # which argument the task used: inputs, texts or images


@dataclass(frozen=True)
class GenerateParams:
    """Sampling settings, checked; the executor hands them to transformers' ``generate``."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    proof: bool = False  # the result carries a proof of its hidden states (hypha_celery.models.proofs)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass(frozen=True)
class GenerateSpec:
    model: str
    params: GenerateParams
    requirements: Requirements
    manifest: Manifest | None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class VerifySpec:
    model: str
    requirements: Requirements
    manifest: Manifest | None
    proof: Proof
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None


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


@dataclass(frozen=True)
class NoopSpec:
    requirements: Requirements
    hold_s: float


def _check_shape(args: Sequence[Any], kwargs: Mapping[str, Any], allowed: set[str], required: set[str], task: str) -> None:
    if args:
        raise InvalidTask(f"{task} takes keyword arguments only ({', '.join(sorted(allowed))}); got {len(args)} positional")
    if not isinstance(kwargs, Mapping):
        raise InvalidTask(f"{task} kwargs must be an object")
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise InvalidTask(f"{task} got an unknown argument {unknown[0]!r} (it takes {', '.join(sorted(allowed))})")
    missing = sorted(required - set(kwargs))
    if missing:
        raise InvalidTask(f"{task} is missing the required argument {missing[0]!r}")


def requirements_for(cfg: WorkerConfig, raw: Any, *, sizable: bool = False) -> Requirements:
    """Parse a task's requirements and hold them to this worker's per-task caps.

    ``"auto"`` sizes are for tasks on a model (``sizable``); sizing replaces them
    before admission (:mod:`hypha_celery.stages.sizing`).
    """
    req = Requirements.parse(raw)
    if req.auto and not sizable:
        raise InvalidTask(f"requirements.{sorted(req.auto)[0]} 'auto' is sized from a model's manifest for "
                          "hypha.infer, hypha.generate and hypha.train on transformers models; give this task a size")
    check_caps(req, max_memory_per_task=cfg.max_memory_per_task, max_cpu_cores_per_task=cfg.max_cpu_cores_per_task)
    return req


def _local_manifest(store: ModelStore, model: str) -> Manifest | None:
    """The manifest if the model is here; ``None`` if it must be fetched (after admission)."""
    if store.has(model):
        return store.manifest(model)
    if not store.sources:
        known = ", ".join(store.list()[:20]) or "none"
        raise UnsupportedModel(f"model {model!r} is not in this worker's store (models here: {known})")
    return None


def check_model_pin(store: ModelStore, model: Any, pin: str | None) -> None:
    """Refuse (``ModelPinMismatch``) a task pinned by ``model_sha256`` to a manifest the store's ``model`` lacks.

    A model not in the store yet passes: the task checks it again once it is fetched, under the lease.
    """
    if pin is None:
        return
    if not isinstance(model, str):
        raise InvalidTask("model_sha256 pins the task's model, but this task names none")
    if not store.has(model):
        return
    held = store.manifest_sha256(model)
    if held != pin:
        raise ModelPinMismatch(f"model {model!r}: the task pins manifest sha256 {pin[:12]}..., this worker's store "
                               f"holds {held[:12]}... (another model under that id); refusing to run it")


def validate_infer(cfg: WorkerConfig, store: ModelStore, args: Sequence[Any], kwargs: Mapping[str, Any]) -> InferSpec:
    _check_shape(args, kwargs, {"model", *_INFER_KINDS, "requirements"}, {"model"}, "hypha.infer")
    given = [kind for kind in _INFER_KINDS if kind in kwargs]
    if not given:
        raise InvalidTask("hypha.infer is missing the required argument 'inputs' (or 'texts', or 'images')")
    if len(given) > 1:
        raise InvalidTask(f"hypha.infer takes exactly one of inputs (numbers), texts or images, got {', '.join(given)}")
    kind = given[0]
    model = validate_model_id(kwargs["model"])
    requirements = requirements_for(cfg, kwargs.get("requirements"), sizable=True)
    manifest = _local_manifest(store, model)
    max_bytes = cfg.security.max_input_bytes
    if kind == "texts":
        payload: Any = {"texts": _check_texts(kwargs["texts"], max_bytes)}
        if manifest is None:  # fetched after admission: the worker-wide bound now, the model's under the lease
            check_texts(payload["texts"], "texts", TextBound.of(None, None, cfg.security.max_text_bytes))
    elif kind == "images":
        payload = {"images": _check_images(kwargs["images"], max_bytes)}
    else:
        payload = kwargs["inputs"]
        if manifest is None and not isinstance(payload, (list, dict)):
            raise InvalidInput("inputs must be a nested list of numbers or an encoded tensor object")
    if manifest is not None:
        check_infer_payload(manifest, kind, payload, max_bytes, cfg.security.max_text_bytes)
    return InferSpec(model=model, inputs=payload, requirements=requirements, manifest=manifest, kind=kind)


def check_infer_payload(manifest: Manifest, kind: str, payload: Any, max_bytes: int,
                        max_text_bytes: int | None = None) -> None:
    """Whether the model takes this kind of input: numbers for built-in models, texts or images by task.

    Texts are held to the model's byte bound (:mod:`hypha_celery.models.text_inputs`; ``max_text_bytes``: the
    worker's override).
    """
    model = manifest.id
    if manifest.runtime == "onnx":
        if kind != "inputs":
            raise InvalidInput(f"model {model!r} is an ONNX model: it takes inputs (numbers), not {kind}")
        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            raise UnsupportedModel(f"model {model!r} is an ONNX model; this worker lacks the [onnx] extra")
        check_inputs(payload, manifest.input_shape, max_bytes=max_bytes, model=model)
        return
    if manifest.runtime != "transformers":
        if kind != "inputs":
            raise InvalidInput(f"model {model!r} is a built-in {manifest.architecture!r} model: it takes inputs, "
                               f"not {kind}")
        check_inputs(payload, manifest.input_shape, max_bytes=max_bytes, model=model)
        return
    if importlib.util.find_spec("transformers") is None:  # finds it without importing it
        raise UnsupportedModel(f"model {model!r} is a transformers model; this worker lacks the [hf] extra")
    if manifest.task == "text-generation":
        raise InvalidTask(f"model {model!r} generates text: send it hypha.generate, not hypha.infer")
    wanted = "texts" if manifest.task in _TEXT_TASKS else "images"
    if kind != wanted:
        raise InvalidInput(f"model {model!r} ({manifest.task}) takes {wanted}, not {kind}")
    if kind == "texts":
        check_texts(payload["texts"], "texts", TextBound.of(model, manifest.max_length, max_text_bytes))


def _check_texts(texts: Any, max_bytes: int) -> list[str]:
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise InvalidInput("texts must be a non-empty list of strings")
    if len(texts) > MAX_TEXTS:
        raise InvalidInput(f"texts holds {len(texts)} texts; at most {MAX_TEXTS} per request")
    check_texts(texts, "texts")  # Unicode scalar values only
    longest = max(len(text) for text in texts)
    if longest > MAX_TEXT_CHARS:
        raise InvalidInput(f"a text has {longest} characters; at most {MAX_TEXT_CHARS} (longer inputs are truncated "
                           "to the model's max_length anyway: send less)")
    size = sum(len(text.encode("utf-8")) for text in texts)
    if size > max_bytes:
        raise InvalidInput(f"texts are {size} bytes, above max_input_bytes ({max_bytes})")
    return list(texts)


def _check_images(images: Any, max_bytes: int) -> list[str]:
    if not isinstance(images, list) or not images or not all(isinstance(image, str) for image in images):
        raise InvalidInput("images must be a non-empty list of base64-encoded PNG or JPEG files")
    if len(images) > MAX_IMAGES:
        raise InvalidInput(f"images holds {len(images)} images; at most {MAX_IMAGES} per request")
    size = sum(len(image) for image in images)
    if size > max_bytes:
        raise InvalidInput(f"images are {size} bytes (base64), above max_input_bytes ({max_bytes})")
    for index, image in enumerate(images):
        try:
            raw = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"images[{index}] is not valid base64") from None
        width, height = image_size(raw, f"images[{index}]")
        if width * height > MAX_IMAGE_PIXELS:
            raise InvalidInput(f"images[{index}] is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels "
                               "(4096 x 4096) per image")
    return list(images)


def image_size(raw: bytes, what: str = "the image") -> tuple[int, int]:
    """``(width, height)`` from a PNG or JPEG header, without decoding it; ``InvalidInput`` for anything else."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) >= 24 and raw[12:16] == b"IHDR":
        width, height = struct.unpack(">II", raw[16:24])
    elif raw.startswith(b"\xff\xd8"):
        width, height = _jpeg_size(raw, what)
    else:
        raise InvalidInput(f"{what} is neither PNG nor JPEG")
    if width <= 0 or height <= 0:
        raise InvalidInput(f"{what} has an empty size ({width}x{height})")
    return width, height


def _jpeg_size(raw: bytes, what: str) -> tuple[int, int]:
    """The first start-of-frame marker's size (SOF0..SOF15 except DHT, JPG and DAC)."""
    at = 2
    while at + 4 <= len(raw):
        if raw[at] != 0xFF:
            break
        marker = raw[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack(">H", raw[at + 2:at + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > len(raw):
                break
            height, width = struct.unpack(">HH", raw[at + 5:at + 9])
            return width, height
        if length < 2:
            break
        at += 2 + length
    raise InvalidInput(f"{what} is a JPEG without a readable frame header")


# LoRA's defaults, chosen so that the README's example visibly changes the model: its B matrices start at
# zero, so a few texts at 2e-4 for one epoch (one or two steps) left the adapter's text equal to the base's.
LORA_LR = 1e-3
LORA_MIN_STEPS = 20


def lora_default_steps(texts: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps of a LoRA run given neither ``epochs`` nor ``max_steps``: one epoch, at least 20."""
    return max(LORA_MIN_STEPS, math.ceil(math.ceil(texts / batch_size) / grad_accum))


def _int_arg(kwargs: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = kwargs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidTask(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def validate_train(
    cfg: WorkerConfig, store: ModelStore, args: Sequence[Any], kwargs: Mapping[str, Any], task_id: str
) -> TrainSpec:
    """A ``hypha.train`` task: a built-in model on rows, or a transformers model on texts (:class:`FinetuneParams`)."""
    _check_shape(args, kwargs, {*_TRAIN_ARGS, *_FINETUNE_ARGS}, {"model", "data"}, "hypha.train")
    model = validate_model_id(kwargs["model"])
    requirements = requirements_for(cfg, kwargs.get("requirements"), sizable=True)
    data = kwargs["data"]
    kind = _train_data_kind(data)
    manifest = _local_manifest(store, model)
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
        given = sorted(set(kwargs) & _FINETUNE_ARGS)
        if given:
            raise InvalidTask(f"{given[0]} applies to transformers models; model {model!r} is a built-in model")
        if requirements.auto:
            raise InvalidTask(f"requirements.{sorted(requirements.auto)[0]} 'auto' is sized from a transformers "
                              "model's manifest; give training a built-in model a size")
        finetune = None
    epochs = _int_arg(kwargs, "epochs", 10 if finetune is None else 1, 1, 1_000_000)
    if finetune is not None and finetune.max_steps is not None and "epochs" in kwargs:
        raise InvalidTask("hypha.train takes epochs or max_steps, not both")
    batch_size = _int_arg(kwargs, "batch_size", 32 if finetune is None else 8, 1, 65_536)
    default_lr = 1e-3 if finetune is None else (LORA_LR if finetune.method == "lora" else 5e-5)
    if finetune is not None and finetune.method == "lora" and finetune.max_steps is None and "epochs" not in kwargs \
            and isinstance(data.get("texts"), list):
        finetune = replace(finetune, max_steps=lora_default_steps(len(data["texts"]), batch_size, finetune.grad_accum))
    lr = kwargs.get("lr", default_lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not 0 < lr <= 10:
        raise InvalidTask(f"lr must be a number in (0, 10], got {lr!r}")
    new_model = validate_model_id(kwargs.get("new_model") or f"{model}-ft-{task_id.replace('-', '')[:12]}")
    finished = None
    if store.has(new_model):
        finished = finished_training(store, new_model, task_id)
        if finished is None:
            raise InvalidTask(f"new_model {new_model!r} already exists; model ids are immutable, pick another")
    max_bytes = cfg.security.max_input_bytes
    if kind == "ref":
        ref = validate_model_id(data["ref"])
        if not (store.path(ref) / DATASET_MANIFEST).is_file() and not store.sources:
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
    """The transformers-only arguments of ``hypha.train``, each checked by name (``InvalidTask``)."""
    if manifest is not None:
        if manifest.adapter_of is not None:
            raise InvalidTask(f"model {manifest.id!r} is a LoRA adapter of {manifest.adapter_of.id!r}: train the base "
                              "model")
        if manifest.task not in _TRAINABLE_TASKS:
            raise InvalidTask(f"model {manifest.id!r} ({manifest.task}): hypha.train fine-tunes "
                              f"{' and '.join(_TRAINABLE_TASKS)} models")
    if importlib.util.find_spec("transformers") is None:  # finds it without importing it
        raise UnsupportedModel(f"model {kwargs['model']!r} is a transformers model; this worker lacks the [hf] extra")
    method = kwargs.get("method", "full")
    if method not in ("full", "lora"):
        raise InvalidTask(f"method must be 'full' or 'lora', got {method!r}")
    merge = kwargs.get("merge", False)
    if not isinstance(merge, bool):
        raise InvalidTask(f"merge must be true or false, got {merge!r}")
    if method == "full" and ("lora" in kwargs or merge):
        raise InvalidTask(f"{'lora' if 'lora' in kwargs else 'merge'} applies to method 'lora' only")
    lora = _lora_settings(kwargs.get("lora", {})) if method == "lora" else None
    if lora is not None and importlib.util.find_spec("peft") is None:
        raise UnsupportedModel("method 'lora' needs peft; this worker lacks it (install hypha-celery[hf])")
    max_steps = kwargs.get("max_steps")
    if max_steps is not None:
        max_steps = _int_arg(kwargs, "max_steps", 1, 1, 10_000_000)
    seed = kwargs.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidTask(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    max_length = _int_arg(kwargs, "max_length", MAX_TRAIN_LENGTH, 1, MAX_TRAIN_LENGTH)
    if manifest is not None and manifest.max_length:
        max_length = min(max_length, manifest.max_length)  # the model's own limit caps it
    return FinetuneParams(method=method, lora=lora, merge=merge, max_steps=max_steps,
                          grad_accum=_int_arg(kwargs, "grad_accum", 1, 1, 1024),
                          warmup_steps=_int_arg(kwargs, "warmup_steps", 0, 0, 10_000_000), seed=seed,
                          max_length=max_length, checkpoint_every=_checkpoint_every(kwargs))


def _checkpoint_every(kwargs: Mapping[str, Any]) -> int | None:
    """``checkpoint_every``: optimizer steps between checkpoints, an integer >= 1, or absent (no checkpoints)."""
    value = kwargs.get("checkpoint_every")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000_000):
        raise InvalidInput(f"checkpoint_every must be an integer from 1 to 10000000 (optimizer steps), got {value!r}")
    return value


def _lora_settings(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise InvalidTask(f"lora must be an object with r, alpha, dropout, target_modules; got {raw!r}")
    unknown = sorted(set(raw) - {"r", "alpha", "dropout", "target_modules"})
    if unknown:
        raise InvalidTask(f"lora got an unknown setting {unknown[0]!r} (it takes r, alpha, dropout, target_modules)")
    settings: dict[str, Any] = {"r": _int_arg(raw, "r", 8, 1, 1024)}
    alpha = raw.get("alpha", 2 * settings["r"])
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or not 0 < alpha <= 100_000:
        raise InvalidTask(f"lora.alpha must be a number in (0, 100000], got {alpha!r}")
    settings["alpha"] = alpha
    dropout = raw.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise InvalidTask(f"lora.dropout must be a number in [0, 1), got {dropout!r}")
    settings["dropout"] = float(dropout)
    targets = raw.get("target_modules")
    if targets is not None:
        if not isinstance(targets, list) or not 0 < len(targets) <= 64 or not all(
                isinstance(t, str) and _MODULE_NAME.match(t) for t in targets):
            raise InvalidTask("lora.target_modules must be a list of 1 to 64 module names (letters, digits, '_', '.'), "
                              f"got {targets!r}")
        settings["target_modules"] = list(targets)
    return settings


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


def validate_noop(cfg: WorkerConfig, args: Sequence[Any], kwargs: Mapping[str, Any]) -> NoopSpec:
    _check_shape(args, kwargs, {"requirements", "hold_s"}, set(), "hypha.noop")
    hold = kwargs.get("hold_s", 0)
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold <= cfg.task_timeout:
        raise InvalidTask(f"hold_s must be a number from 0 to task_timeout ({cfg.task_timeout:g}), got {hold!r}")
    return NoopSpec(requirements=requirements_for(cfg, kwargs.get("requirements")), hold_s=float(hold))


def validate_generate(cfg: WorkerConfig, store: ModelStore, args: Sequence[Any], kwargs: Mapping[str, Any]) -> GenerateSpec:
    allowed = {"model", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "seed",
               "stop", "repetition_penalty", "requirements", "proof"}
    _check_shape(args, kwargs, allowed, {"model"}, "hypha.generate")
    model = validate_model_id(kwargs["model"])
    requirements = requirements_for(cfg, kwargs.get("requirements"), sizable=True)
    prompt, messages = _prompt_or_messages(kwargs, cfg.security.max_input_bytes, "hypha.generate")
    params = generate_params(kwargs, cfg.generation.max_new_tokens)
    manifest = _local_manifest(store, model)
    if manifest is not None:
        check_generate_model(store, manifest, messages is not None)
    check_prompt_bytes(prompt, messages, manifest, cfg.security.max_text_bytes)
    return GenerateSpec(model=model, params=params, requirements=requirements, manifest=manifest, prompt=prompt,
                        messages=messages)


def _prompt_or_messages(kwargs: Mapping[str, Any], max_bytes: int, task: str
                        ) -> tuple[str | None, list[dict[str, str]] | None]:
    if ("prompt" in kwargs) == ("messages" in kwargs):
        raise InvalidTask(f"{task} takes exactly one of prompt (a string) or messages (chat turns)")
    if "messages" in kwargs:
        return None, _check_messages(kwargs["messages"], max_bytes)
    prompt = kwargs["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidTask("prompt must be a non-empty string")
    if len(prompt.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidInput(f"prompt is above max_input_bytes ({max_bytes})")
    check_text(prompt, "prompt")  # Unicode scalar values only
    return prompt, None


def validate_verify(cfg: WorkerConfig, store: ModelStore, args: Sequence[Any], kwargs: Mapping[str, Any]) -> VerifySpec:
    """``hypha.verify``: the model, the prompt (or messages) the client sent, and the generation's ``proof``."""
    _check_shape(args, kwargs, {"model", "prompt", "messages", "proof", "requirements"}, {"model", "proof"},
                 "hypha.verify")
    model = validate_model_id(kwargs["model"])
    requirements = requirements_for(cfg, kwargs.get("requirements"), sizable=True)
    prompt, messages = _prompt_or_messages(kwargs, cfg.security.max_input_bytes, "hypha.verify")
    try:
        proof = Proof.from_json(kwargs["proof"])
    except ProofFormatError as exc:
        raise InvalidInput(str(exc)) from None
    if len(proof.tokens) > cfg.generation.max_new_tokens:
        raise InvalidInput(f"the proof covers {len(proof.tokens)} tokens, above this worker's max_new_tokens "
                           f"({cfg.generation.max_new_tokens})")
    manifest = _local_manifest(store, model)
    if manifest is not None:
        check_generate_model(store, manifest, messages is not None)
    check_prompt_bytes(prompt, messages, manifest, cfg.security.max_text_bytes)
    return VerifySpec(model=model, requirements=requirements, manifest=manifest, proof=proof, prompt=prompt,
                      messages=messages)


def check_prompt_bytes(prompt: str | None, messages: list[dict[str, str]] | None, manifest: Manifest | None,
                       max_text_bytes: int | None) -> None:
    """The prompt (or the messages' contents together) within the model's byte bound, or the worker-wide one when
    the model is not read yet (``manifest`` None: checked again under the lease, once fetched)."""
    bound = TextBound.of(manifest.id if manifest else None, manifest.max_length if manifest else None, max_text_bytes)
    if prompt is not None:
        check_text(prompt, "prompt", bound)
    else:
        check_text("".join(m["content"] for m in messages or []), "messages' contents together", bound)


def generate_params(kwargs: Mapping[str, Any], max_new_tokens: int) -> GenerateParams:
    """The sampling settings in ``kwargs``, each checked for type and range (named InvalidTask errors)."""
    do_sample = kwargs.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise InvalidTask(f"do_sample must be true or false, got {do_sample!r}")
    seed = kwargs.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InvalidTask(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    return GenerateParams(
        max_new_tokens=_int_arg(kwargs, "max_new_tokens", min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens), 1,
                                max_new_tokens),
        do_sample=do_sample,
        temperature=_float_arg(kwargs, "temperature", 1.0, 0.0, 100.0, low_open=True),
        top_p=_float_arg(kwargs, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_int_arg(kwargs, "top_k", 50, 0, 1_000_000),
        repetition_penalty=_float_arg(kwargs, "repetition_penalty", 1.0, 0.0, 100.0, low_open=True),
        seed=seed,
        stop=_check_stop(kwargs.get("stop", [])),
        proof=_bool_arg(kwargs, "proof"),
    )


def _bool_arg(kwargs: Mapping[str, Any], name: str) -> bool:
    value = kwargs.get(name, False)
    if not isinstance(value, bool):
        raise InvalidTask(f"{name} must be true or false, got {value!r}")
    return value


def _float_arg(kwargs: Mapping[str, Any], name: str, default: float, low: float, high: float, *,
               low_open: bool = False) -> float:
    value = kwargs.get(name, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value > high or value < low or (low_open and value == low)):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidTask(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_stop(stop: Any) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise InvalidTask(f"stop must be a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
                          f"{MAX_STOP_CHARS} characters")
    check_texts(stop, "stop")
    return tuple(stop)


def _check_messages(messages: Any, max_bytes: int) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise InvalidTask(f"messages must be a non-empty list of at most {MAX_MESSAGES} {{role, content}} objects")
    size = 0
    for index, message in enumerate(messages):
        if (not isinstance(message, Mapping) or set(message) != {"role", "content"}
                or message["role"] not in _ROLES or not isinstance(message["content"], str)):
            raise InvalidTask(f"messages[{index}] must be {{'role': one of {', '.join(_ROLES)}, 'content': a string}}")
        error = unicode_error(message["content"], f"messages[{index}].content")
        if error is not None:
            raise error
        size += len(message["content"].encode("utf-8"))
    if size > max_bytes:
        raise InvalidInput(f"messages are {size} bytes, above max_input_bytes ({max_bytes})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_generate_model(store: ModelStore, manifest: Manifest, chat: bool) -> None:
    """Whether ``manifest`` is a text-generation model (with a chat template when ``messages`` were sent)."""
    model = manifest.id
    if manifest.runtime != "transformers" or manifest.task != "text-generation":
        what = manifest.task if manifest.runtime == "transformers" else f"a built-in {manifest.architecture!r} model"
        raise InvalidTask(f"model {model!r} is {what}, not a text-generation model: send it "
                          f"{_TASK_FOR.get(manifest.task, 'hypha.infer')}")
    if importlib.util.find_spec("transformers") is None:  # finds it without importing it
        raise UnsupportedModel(f"model {model!r} is a transformers model; this worker lacks the [hf] extra")
    templated = manifest
    if manifest.adapter_of is not None and store.has(manifest.adapter_of.id):  # an adapter: its base's template
        templated = store.manifest(manifest.adapter_of.id)
    if chat and not has_chat_template(store, templated):
        raise InvalidTask(f"model {model!r} has no chat template (chat_template.jinja or tokenizer_config.json's "
                          "chat_template): send a prompt, not messages")


def has_chat_template(store: ModelStore, manifest: Manifest) -> bool:
    """A chat template in the stored files: ``chat_template.jinja`` or ``tokenizer_config.json``'s key."""
    if "chat_template.jinja" in manifest.files:
        return True
    if "tokenizer_config.json" not in manifest.files:
        return False
    try:
        config = json.loads((store.path(manifest.id) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))
