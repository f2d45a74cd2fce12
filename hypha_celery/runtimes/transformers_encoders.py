"""The transformers runtime's encoders: embeddings, text classification and image classification.

Every text (or image) of every item of a ``hypha.infer`` batch runs in passes
sorted by length, bounded by :data:`MAX_BATCH_ROWS` and :data:`MAX_BATCH_TOKENS`
so padding and activation memory stay small; each item gets its own results
back, in order. A batch that mixes adapters of one base runs each row with
its own (:mod:`.transformers_adapters`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import torch

from hypha_celery.errors import InvalidInput, UnsupportedModel
from hypha_celery.formats.huggingface import FEATURE_EXTRACTION, IMAGE_CLASSIFICATION
from hypha_celery.models.tensors import MAX_IMAGE_PIXELS
from hypha_celery.models.text_inputs import check_texts
from hypha_celery.runtimes.transformers_adapters import RowAdapters, row_name, selected
from hypha_celery.runtimes.transformers_loading import TransformerModel

__all__ = ["MAX_BATCH_ROWS", "MAX_BATCH_TOKENS", "infer_batch"]

# One forward pass holds at most this many texts, and this many (padded) tokens: bounds activation memory.
MAX_BATCH_ROWS = 64
MAX_BATCH_TOKENS = 16_384


def infer_batch(model: TransformerModel, items: Sequence[Any], per_item: Sequence[TransformerModel] | None = None
                ) -> list[Any]:
    """Answer each item (``{"texts": [...]}`` or ``{"images": [...]}``) of a batch of requests to an encoder.

    ``per_item``: each item's model when the batch mixes adapters of ``model``'s base.
    """
    with selected(model, per_item) as mixed:
        return _infer(model, items, per_item, mixed)


def _infer(model: TransformerModel, items: Sequence[Any], per_item: Sequence[TransformerModel] | None,
           mixed: RowAdapters | None) -> list[Any]:
    key = "images" if model.task == IMAGE_CLASSIFICATION else "texts"
    flat: list[Any] = []
    owners: list[int] = []
    for index, item in enumerate(items):
        values = item.get(key) if isinstance(item, dict) else None
        if not isinstance(values, list) or not values:
            raise InvalidInput(f"model {model.manifest.id!r} ({model.task}) takes {key!r}")
        flat.extend(values)
        owners.extend([index] * len(values))
    names = [row_name(per_item[owner]) for owner in owners] if mixed is not None and per_item else None
    rows = _images(model, flat, mixed, names) if key == "images" else _texts(model, flat, mixed, names)
    results: list[list[Any]] = [[] for _ in items]
    for owner, row in zip(owners, rows, strict=True):
        results[owner].append(row)
    if model.task == FEATURE_EXTRACTION:
        return [{"embeddings": rows_of, "dim": len(rows_of[0])} for rows_of in results]
    return results


def _texts(model: TransformerModel, texts: list[str], mixed: RowAdapters | None = None,
           names: list[str] | None = None) -> list[Any]:
    check_texts(texts, "texts", model.text_bound())  # before the tokenizer: validation's check, once more
    encoded = model.tokenizer(texts, truncation=True, max_length=model.max_length, padding=False)
    ids: list[list[int]] = encoded["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    out: list[Any] = [None] * len(texts)
    for chunk in _chunks(order, [len(row) for row in ids]):
        features = model.tokenizer.pad({name: [encoded[name][i] for i in chunk] for name in encoded.keys()},
                                       padding=True, return_tensors="pt")
        features = {name: tensor.to(model.device) for name, tensor in features.items()}
        if mixed is not None and names is not None:
            mixed.rows = [names[i] for i in chunk]
        with torch.inference_mode():
            output = model.module(**features)
        rows = _embeddings(model, output, features["attention_mask"]) if model.task == FEATURE_EXTRACTION \
            else _classes(model, output.logits)
        for index, row in zip(chunk, rows, strict=True):
            out[index] = row
    return out


def _chunks(order: list[int], lengths: list[int]) -> list[list[int]]:
    """Consecutive runs of ``order`` (sorted by length) within the rows and padded-token budgets."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[index]  # sorted ascending: the newest is the longest
        if current and (len(current) >= MAX_BATCH_ROWS or (len(current) + 1) * longest > MAX_BATCH_TOKENS):
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks


def _embeddings(model: TransformerModel, output: Any, mask: torch.Tensor) -> list[list[float]]:
    assert model.pooling is not None
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise UnsupportedModel(f"model {model.manifest.id!r} returns no last_hidden_state to pool")
    return model.pooling.apply(hidden, mask).cpu().tolist()


def _classes(model: TransformerModel, logits: torch.Tensor) -> list[dict[str, Any]]:
    logits = logits.float()
    probabilities = torch.sigmoid(logits) if model.multi_label else torch.softmax(logits, dim=-1)
    labels = model.labels or [f"LABEL_{i}" for i in range(logits.shape[-1])]
    rows = []
    for row in probabilities.cpu().tolist():
        best = max(range(len(row)), key=row.__getitem__)
        rows.append({"label": labels[best], "score": row[best], "scores": dict(zip(labels, row, strict=True))})
    return rows


def _images(model: TransformerModel, images: list[str], mixed: RowAdapters | None = None,
            names: list[str] | None = None) -> list[Any]:
    from PIL import Image

    decoded = []
    for encoded in images:
        try:
            with Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))) as image:
                if image.format not in ("PNG", "JPEG") or image.width * image.height > MAX_IMAGE_PIXELS:
                    raise InvalidInput(f"an image must be a PNG or JPEG of at most {MAX_IMAGE_PIXELS} pixels")
                decoded.append(image.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise InvalidInput(f"an image could not be decoded: {exc}") from None
    out: list[Any] = []
    for start in range(0, len(decoded), MAX_BATCH_ROWS):
        pixels = model.image_processor(images=decoded[start:start + MAX_BATCH_ROWS], return_tensors="pt")["pixel_values"]
        if mixed is not None and names is not None:
            mixed.rows = names[start:start + MAX_BATCH_ROWS]
        with torch.inference_mode():
            logits = model.module(pixel_values=pixels.to(model.device, model.module.dtype)).logits
        out.extend(_classes(model, logits))
    return out
