"""Saving a fine-tune's result into a folder the store then takes in: a full model or a LoRA adapter.

A full model in Hugging Face layout (``save_pretrained``: config.json and model.safetensors, plus
the base's tokenizer files) for ``ModelStore.add("transformers", ...)``, or peft's ``adapter_config.json`` +
``adapter_model.safetensors`` for ``ModelStore.add(..., base=...)``. Apart from the loop: the executor
saves after training, and what an entry may hold is the store's concern, not the optimizer's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hypha_celery.manifest import CONFIG, SAFETENSORS_SINGLE
from hypha_celery.models.store import Entry
from hypha_celery.training.finetune.lora import save_adapter
from hypha_celery.training.finetune.run import Finetuned

__all__ = ["save"]

# Files of the base copied beside a fully trained model (save_pretrained writes config and weights itself).
_WEIGHT_FILES = (CONFIG, SAFETENSORS_SINGLE, "model.safetensors.index.json")


def save(done: Finetuned, out: Path, *, merge: bool) -> str:
    """Write the result into the empty folder ``out``; returns ``"adapter"`` or ``"model"`` (what ``out`` holds).

    Safetensors only. An adapter folder holds exactly peft's two files; a model folder
    holds ``save_pretrained``'s config.json and weights plus the base's other files
    (tokenizer, generation config, sentence-transformers settings).
    """
    module = done.module
    if done.method == "lora" and not merge:
        save_adapter(module, done.model.manifest.id, out)
        return "adapter"
    if done.method == "lora":
        module = module.merge_and_unload()
    module.save_pretrained(str(out), safe_serialization=True)
    _copy_base_files(done.entry, out)
    return "model"


def _copy_base_files(base: Entry, out: Path) -> None:
    for name, path in base.files().items():
        if name in _WEIGHT_FILES or name.startswith("model-") or (out / name).exists():
            continue
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
