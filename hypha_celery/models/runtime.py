"""Running stored models with torch: load, infer (batched), train.

Used inside executor processes only (:mod:`hypha_celery.executor.child`);
importing this module imports torch, so the worker's own processes never do.
A manifest's ``runtime`` picks the code: ``builtin`` (``mlp``, ``cnn``) is
here; ``transformers`` is :mod:`.transformers_runtime` (imported only when
such a model is loaded, since transformers costs seconds to import); ``onnx``
is :mod:`.onnx_runtime` (onnxruntime, imported only for such a model).
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hypha_celery.errors import InvalidInput, UnsupportedModel
from hypha_celery.formats.builtin import build
from hypha_celery.manifest import Manifest
from hypha_celery.models.store import ModelStore
from hypha_celery.protocol import Progress, Trained

__all__ = ["Loaded", "infer_batch", "load", "model_bytes", "train"]

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
MAX_CURVE_POINTS = 1000


@dataclass
class Loaded:
    module: nn.Module
    manifest: Manifest
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.manifest.dtype]


def model_bytes(module: nn.Module) -> int:
    """The model's real memory: parameters and buffers, on whatever device they live."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def load(store: ModelStore, model_id: str, device: str, *, trainable: bool = False) -> tuple[Any, int]:
    """Verify and load ``model_id`` onto ``device``; returns the model and its size in bytes."""
    runtime = store.manifest(model_id).runtime
    if runtime == "onnx":
        if trainable:
            raise UnsupportedModel(f"model {model_id!r}: an ONNX model serves hypha.infer only; it cannot be trained")
        from hypha_celery.models import onnx_runtime

        return onnx_runtime.load(store, model_id, device)
    if runtime == "transformers":
        if trainable:
            raise UnsupportedModel(f"model {model_id!r}: hypha.train supports the built-in architectures only")
        from hypha_celery.models import transformers_runtime

        return transformers_runtime.load(store, model_id, device)
    return _load_builtin(store, model_id, device, trainable=trainable)


def _load_builtin(store: ModelStore, model_id: str, device: str, *, trainable: bool) -> tuple[Loaded, int]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest, path = store.verified_weights(model_id)
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
    return Loaded(module, manifest, torch.device(device)), model_bytes(module)


def _decode(inputs: Any, sample_shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    if isinstance(inputs, dict):
        raw = base64.b64decode(inputs["data"])
        tensor = torch.frombuffer(bytearray(raw), dtype=_TORCH_DTYPES[inputs["dtype"]]).reshape(inputs["shape"])
    else:
        tensor = torch.tensor(inputs)
    return tensor.to(dtype).reshape(-1, *sample_shape)


def _encode(tensor: torch.Tensor, like: Any, single: bool) -> Any:
    if single:
        tensor = tensor[0]
    if isinstance(like, dict):
        out = tensor.detach().to("cpu").contiguous()
        if out.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            out = out.float()
        name = str(out.dtype).removeprefix("torch.")
        data = out.view(torch.uint8).numpy().tobytes() if out.dtype == torch.bfloat16 else out.numpy().tobytes()
        return {"dtype": name, "shape": list(out.shape), "data": base64.b64encode(data).decode("ascii")}
    return tensor.detach().to("cpu", torch.float32).tolist()


def infer_batch(loaded: Any, items: Sequence[Any], per_item: Sequence[Any] | None = None) -> list[Any]:
    """Answer every item of a batch: a transformers model's texts or images, or a built-in or ONNX model's rows.

    ``per_item``: each item's transformers model when the batch mixes adapters of one base.
    """
    if getattr(getattr(loaded, "manifest", None), "runtime", None) == "onnx":
        from hypha_celery.models import onnx_runtime

        return onnx_runtime.infer_batch(loaded, items)
    if not isinstance(loaded, Loaded):
        from hypha_celery.models import transformers_runtime

        return transformers_runtime.infer_batch(loaded, items, per_item)
    return _infer_builtin(loaded, items)


def _infer_builtin(loaded: Loaded, items: Sequence[Any]) -> list[Any]:
    """One forward pass over every item's rows; each item gets its own rows back, in its own form."""
    shape = loaded.manifest.input_shape
    tensors = [_decode(item, shape, loaded.dtype) for item in items]
    counts = [t.shape[0] for t in tensors]
    batch = torch.cat(tensors).to(loaded.device)
    with torch.inference_mode():
        output = loaded.module(batch)
    outputs = []
    for item, part in zip(items, torch.split(output, counts), strict=True):
        single = _is_single(item, shape)
        outputs.append(_encode(part, item, single))
    return outputs


def _is_single(item: Any, shape: list[int]) -> bool:
    if isinstance(item, dict):
        return list(item["shape"]) == list(shape)
    depth, level = 0, item
    while isinstance(level, list):
        depth, level = depth + 1, level[0]
    return depth == len(shape)


def _targets(loaded: Loaded, targets: Any, rows: int) -> torch.Tensor:
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
    loaded: Loaded,
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
    inputs = _decode(data["inputs"], shape, loaded.dtype).to(loaded.device)
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
