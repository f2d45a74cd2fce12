"""LoRA for a fine-tune: the peft wrapper around a loaded model, its target modules by model type.

Apart from the loop because peft is optional (``hypha-celery[hf]``) and imported only when a LoRA
run starts; a full fine-tune never needs it.
"""

from __future__ import annotations

import warnings
from typing import Any

from hypha_celery.errors import InvalidInput, UnsupportedModel
from hypha_celery.formats.huggingface import LORA_TARGET_MODULES, TEXT_GENERATION
from hypha_celery.runtimes.transformers_loading import TransformerModel

__all__ = ["with_lora"]


def with_lora(model: TransformerModel, settings: dict[str, Any]) -> Any:
    """``model``'s module wrapped in LoRA adapters as ``settings`` say (r, alpha, dropout, target_modules)."""
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
