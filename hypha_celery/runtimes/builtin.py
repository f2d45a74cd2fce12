"""The built-in runtime: stored ``mlp`` and ``cnn`` models (safetensors weights) run with torch.

Load, infer (every item's rows in one forward pass) and train (Adam, in place,
for ``hypha.train``; a transformers model is fine-tuned by
:mod:`hypha_celery.models.finetune` instead, an ONNX model is not trained).
Used inside executor processes only, through :mod:`.registry`; importing this
module imports torch, so the worker's own processes never do. Inputs and
outputs are :mod:`.codec`'s rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hypha_celery.errors import InvalidInput, UnsupportedModel
from hypha_celery.formats.builtin import build
from hypha_celery.manifest import WEIGHTS, Manifest
from hypha_celery.models.store import Entry
from hypha_celery.runtimes.codec import DTYPES, decode, encode, is_single
from hypha_celery.work import Progress, Trained

__all__ = ["BuiltinModel", "infer_batch", "load", "model_bytes", "train"]

MAX_CURVE_POINTS = 1000


@dataclass
class BuiltinModel:
    """A loaded built-in model: its module, its manifest and the device it is on."""

    module: nn.Module
    manifest: Manifest
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest.dtype]


def model_bytes(module: nn.Module) -> int:
    """The model's real memory: parameters and buffers, on whatever device they live."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def load(entry: Entry, device: str, *, trainable: bool = False) -> tuple[BuiltinModel, int]:
    """Load the verified ``entry``'s weights onto ``device`` (``trainable``: in train mode, with gradients);
    returns the model and its size in bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest, path, model_id = entry.manifest, entry.file(WEIGHTS), entry.id
    try:
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UnsupportedModel(f"model {model_id!r}: weights unreadable ({exc})") from None
    module = build(manifest.architecture, manifest.config, device="meta")
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise UnsupportedModel(f"model {model_id!r}: weights do not fit architecture {manifest.architecture!r}: {exc}") from None
    module.train(trainable)
    module.requires_grad_(trainable)
    return BuiltinModel(module, manifest, torch.device(device)), model_bytes(module)


def infer_batch(loaded: BuiltinModel, items: Sequence[Any], per_item: Sequence[Any] | None = None) -> list[Any]:
    """One forward pass over every item's rows; each item gets its own rows back, in its own form.

    ``per_item`` is for runtimes with adapters; a built-in model has none.
    """
    shape = loaded.manifest.input_shape
    tensors = [decode(item, shape, loaded.dtype) for item in items]
    counts = [t.shape[0] for t in tensors]
    batch = torch.cat(tensors).to(loaded.device)
    with torch.inference_mode():
        output = loaded.module(batch)
    outputs = []
    for item, part in zip(items, torch.split(output, counts), strict=True):
        outputs.append(encode(part, item, is_single(item, shape)))
    return outputs


def _targets(loaded: BuiltinModel, targets: Any, rows: int) -> torch.Tensor:
    if not isinstance(targets, list) or len(targets) != rows:
        raise InvalidInput(f"data.targets must be a list with one target per input row ({rows})")
    if loaded.manifest.task == "classification":
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in targets):
            raise InvalidInput("data.targets must be class indices (integers) for a classification model")
        tensor = torch.tensor(targets, dtype=torch.int64)
        with torch.no_grad():
            probe = torch.zeros(1, *loaded.manifest.input_shape, dtype=loaded.dtype, device=loaded.device)
            classes = loaded.module(probe).shape[-1]
        if tensor.min() < 0 or tensor.max() >= classes:
            raise InvalidInput(f"data.targets must be class indices in [0, {classes})")
        return tensor
    try:
        return torch.tensor(targets, dtype=loaded.dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"data.targets must be numbers: {exc}") from None


def train(
    loaded: BuiltinModel,
    data: dict[str, Any],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    progress: Callable[[Progress], None],
    progress_interval: float = 0.25,
    seed: int = 0,
) -> Trained:
    """Fine-tune ``loaded`` in place with Adam; report progress at most every ``progress_interval`` s."""
    shape = loaded.manifest.input_shape
    inputs = decode(data["inputs"], shape, loaded.dtype).to(loaded.device)
    targets = _targets(loaded, data["targets"], inputs.shape[0]).to(loaded.device)
    loss_fn: nn.Module = nn.CrossEntropyLoss() if loaded.manifest.task == "classification" else nn.MSELoss()
    optimizer = torch.optim.Adam(loaded.module.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    rows = inputs.shape[0]
    steps_per_epoch = math.ceil(rows / batch_size)
    total_steps = epochs * steps_per_epoch
    curve: list[float] = []
    step, last_report = 0, 0.0
    loaded.module.train(True)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(rows, generator=generator).to(loaded.device)
        epoch_loss = 0.0
        for start in range(0, rows, batch_size):
            index = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(loaded.module(inputs[index]), targets[index])
            loss.backward()
            optimizer.step()
            step += 1
            value = float(loss.detach())
            epoch_loss += value * index.numel()
            now = time.monotonic()
            if now - last_report >= progress_interval:
                last_report = now
                progress(Progress(epoch=epoch, epochs=epochs, step=step, steps=total_steps, loss=value,
                                  percent=round(100.0 * step / total_steps, 2)))
        curve.append(epoch_loss / rows)
    loaded.module.train(False)
    progress(Progress(epoch=epochs, epochs=epochs, step=step, steps=total_steps, loss=curve[-1], percent=100.0))
    stride = max(1, math.ceil(len(curve) / MAX_CURVE_POINTS))
    sampled = curve[::stride]
    if sampled[-1] != curve[-1]:
        sampled.append(curve[-1])
    return Trained(final_loss=curve[-1], loss_curve=sampled, epochs=epochs, steps=step, samples=rows)
