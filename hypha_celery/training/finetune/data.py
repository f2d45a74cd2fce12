"""A fine-tune's data: the examples checked against the model, and one micro-batch as tensors.

Split from the loop so that what the data may be (texts, labels as names or class ids, a text's
byte bound) reads apart from how it is trained on. ``{"texts": [...]}`` trains a causal LM
(next-token loss; padding is ignored: its labels are -100); ``{"texts": [...], "labels": [...]}``
trains a text classifier. Texts are truncated to ``max_length`` tokens and padded per batch.
"""

from __future__ import annotations

from typing import Any

import torch

from hypha_celery.errors import InvalidInput
from hypha_celery.formats.huggingface import TEXT_GENERATION
from hypha_celery.models.tensors import resolve_labels
from hypha_celery.models.text_inputs import check_texts
from hypha_celery.runtimes.transformers_loading import TransformerModel

__all__ = ["IGNORE_INDEX", "batch", "examples"]

IGNORE_INDEX = -100  # torch's cross-entropy ignores these labels: padding


def examples(model: TransformerModel, data: dict[str, Any]) -> tuple[list[str], list[int] | None]:
    """The texts (and a classifier's labels as class ids), checked: ``InvalidInput`` names what is wrong."""
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


def batch(model: TransformerModel, texts: list[str], labels: list[int] | None, max_length: int
           ) -> tuple[dict[str, torch.Tensor], int]:
    """One micro-batch as the model's inputs with labels, and its count of real (unpadded) tokens."""
    encoded = model.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    inputs = {key: value.to(model.device) for key, value in encoded.items()
              if key in ("input_ids", "attention_mask", "token_type_ids")}
    mask = inputs["attention_mask"]
    if labels is None:
        inputs["labels"] = inputs["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
    else:
        inputs["labels"] = torch.tensor(labels, dtype=torch.int64, device=model.device)
    return inputs, int(mask.sum())
