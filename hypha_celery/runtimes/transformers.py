"""The transformers runtime: stored Hugging Face models served with transformers (``runtime: transformers``).

What :mod:`.registry` calls for such a model; each concern is its own module:
loading without running a model's code (:mod:`.transformers_loading`), LoRA
adapters on a shared base (:mod:`.transformers_adapters`), embeddings and
classification (:mod:`.transformers_encoders`), generation
(:mod:`.transformers_generation`), and a generation's proof, captured and
replayed (:mod:`.transformers_proofs`). Training a transformers model is
fine-tuning (full or LoRA, :mod:`hypha_celery.models.finetune`), which loads
the model itself. Importing this module imports torch; transformers is
imported when a model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypha_celery.errors import InvalidTask, UnsupportedModel
from hypha_celery.formats.huggingface import TEXT_GENERATION
from hypha_celery.models.store import Entry
from hypha_celery.runtimes import transformers_encoders, transformers_loading, transformers_proofs
from hypha_celery.runtimes.transformers_generation import generate
from hypha_celery.runtimes.transformers_loading import TransformerModel

__all__ = ["generate", "infer_batch", "load"]


def load(entry: Entry, device: str, *, trainable: bool = False) -> tuple[TransformerModel, int]:
    """Load the verified ``entry`` onto ``device`` to serve; returns it and its real bytes."""
    if trainable:
        raise UnsupportedModel(f"model {entry.id!r}: a transformers model is trained by fine-tuning (full or LoRA), "
                               "which loads it itself")
    return transformers_loading.load(entry, device)


def infer_batch(model: TransformerModel, items: Sequence[Any], per_item: Sequence[TransformerModel] | None = None
                ) -> list[Any]:
    """Answer each item of a ``hypha.infer`` batch: an encoder's texts or images, or a generator's proofs to verify.

    ``per_item``: each item's model when the batch mixes adapters of ``model``'s base.
    """
    if model.task == TEXT_GENERATION:
        if items and all(isinstance(item, dict) and set(item) == {"verify"} for item in items):
            # hypha.verify: a prefill replays a generation
            return [transformers_proofs.verify(per_item[i] if per_item else model, item["verify"])
                    for i, item in enumerate(items)]
        raise InvalidTask(f"model {model.manifest.id!r} generates text: send it hypha.generate, not hypha.infer")
    return transformers_encoders.infer_batch(model, items, per_item)
