"""Validate a task's keyword arguments before it may reserve anything, one module per task kind.

Each kind declares its arguments for the one checker (:mod:`.arguments`: name, type, bounds, default, required
or allowed) and has one ``validate_*`` function returning a frozen spec, or raising the named error a person
can act on: ``InvalidTask`` for an argument (positional, unknown, missing, of the wrong type or out of bounds;
the message names it), ``InvalidInput`` for what the inputs hold, ``UnsupportedModel`` (model id), and the
per-task caps (``ExcessiveMemoryRequest``, ``InsufficientCpu``).

Every text (a prompt, a chat message, a text to embed or classify, a training text, a stop string) must be
Unicode scalar values (a lone surrogate is ``InvalidInput`` naming the argument and the character), and every
text a tokenizer will read must be within the model's byte bound (:mod:`hypha_celery.models.text_inputs`), all
before anything is reserved.

The kinds: :mod:`.infer`, :mod:`.generate`, :mod:`.verify`, :mod:`.train`, :mod:`.noop`; :mod:`.common` holds
what they share (requirements, the model in the store, its pin). Callers import from here.
"""

from hypha_celery.stages.validation.arguments import Arg, TaskArgs, check_arguments, check_value, check_values
from hypha_celery.stages.validation.common import MAX_TEXT_CHARS, check_model_pin, requirements_for
from hypha_celery.stages.validation.generate import (
    GenerateParams,
    GenerateSpec,
    check_generate_model,
    check_prompt_bytes,
    validate_generate,
)
from hypha_celery.stages.validation.infer import (
    MAX_IMAGES,
    MAX_TEXTS,
    InferSpec,
    check_infer_payload,
    image_size,
    validate_infer,
)
from hypha_celery.stages.validation.noop import NoopSpec, validate_noop
from hypha_celery.stages.validation.train import (
    LORA_LR,
    LORA_MIN_STEPS,
    MAX_TRAIN_TEXTS,
    FinetuneParams,
    TrainSpec,
    check_training_texts,
    finetune_params,
    finished_training,
    lora_default_steps,
    validate_train,
)
from hypha_celery.stages.validation.verify import VerifySpec, validate_verify

__all__ = [
    "LORA_LR",
    "LORA_MIN_STEPS",
    "MAX_IMAGES",
    "MAX_TEXTS",
    "MAX_TEXT_CHARS",
    "MAX_TRAIN_TEXTS",
    "Arg",
    "FinetuneParams",
    "GenerateParams",
    "GenerateSpec",
    "InferSpec",
    "NoopSpec",
    "TaskArgs",
    "TrainSpec",
    "VerifySpec",
    "check_arguments",
    "check_generate_model",
    "check_infer_payload",
    "check_model_pin",
    "check_prompt_bytes",
    "check_training_texts",
    "check_value",
    "check_values",
    "finetune_params",
    "finished_training",
    "image_size",
    "lora_default_steps",
    "requirements_for",
    "validate_generate",
    "validate_infer",
    "validate_noop",
    "validate_train",
    "validate_verify",
]
