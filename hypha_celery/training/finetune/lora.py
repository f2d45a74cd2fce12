"""LoRA for a fine-tune: the peft wrapper around a loaded model, its target modules by model type.

Apart from the loop because peft is optional (``hypha-celery[hf]``) and imported only when a LoRA
run starts; a full fine-tune never needs it. Besides a fresh adapter (:func:`with_lora`), a run may
continue a stored adapter of the model (:func:`continue_lora`: a DiLoCo round trains the job's current
global adapter), and :func:`fresh_adapter` writes a LoRA job's first adapter without training it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from hypha_celery.errors import InvalidInput, UnsupportedModel
from hypha_celery.formats.huggingface import LORA_TARGET_MODULES, TEXT_GENERATION
from hypha_celery.manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from hypha_celery.models.store import Entry
from hypha_celery.runtimes.transformers_loading import TransformerModel

__all__ = ["continue_lora", "fresh_adapter", "save_adapter", "with_lora"]


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


def continue_lora(model: TransformerModel, base: Entry, adapter: Entry) -> Any:
    """``model``'s module with the stored ``adapter`` attached, trainable: a run that continues it.

    The adapter must name ``base`` (the loaded model's entry) by id and manifest sha256; its two files are read
    through a private view, as for serving (:func:`hypha_celery.runtimes.transformers_adapters.attach_adapter`).
    """
    try:
        from peft import PeftModel
    except ImportError:
        raise UnsupportedModel("method 'lora' needs peft: install hypha-celery[hf]") from None
    of = adapter.manifest.adapter_of
    if of is None or of.id != base.id or of.sha256 != base.sha256:
        raise UnsupportedModel(f"model {adapter.id!r} is not an adapter of this {base.id!r} (its id or manifest "
                               "sha256 differs); refusing to continue it")
    view = Path(tempfile.mkdtemp(prefix=f"hf-view-{adapter.id}-", dir=tempfile.gettempdir()))
    try:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            (view / name).symlink_to(adapter.file(name).resolve())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model.module, str(view), is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UnsupportedModel(f"adapter {adapter.id!r} could not be attached to {base.id!r}: {exc}") from None
    finally:
        shutil.rmtree(view, ignore_errors=True)


def save_adapter(module: Any, base_id: str, out: Path) -> None:
    """peft's two adapter files of ``module`` in the empty folder ``out``, its config naming ``base_id`` (a store id:
    nothing loads by it); peft's model card and anything else removed."""
    module.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = base_id
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for entry in out.iterdir():
        if entry.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def fresh_adapter(entry: Entry, settings: dict[str, Any], seed: int, out: Path) -> None:
    """A fresh LoRA adapter of the stored model ``entry`` (``settings`` as for :func:`with_lora`, initialised from
    ``seed``) saved into ``out``: a LoRA DiLoCo job's version 0, which every worker then trains from. The base is
    loaded on the CPU in float32, as a training run loads it."""
    import torch

    from hypha_celery.runtimes.transformers_loading import load

    torch.manual_seed(seed)
    loaded, _ = load(entry, "cpu", dtype="float32")
    module = with_lora(loaded, settings)
    save_adapter(module, entry.id, out)
