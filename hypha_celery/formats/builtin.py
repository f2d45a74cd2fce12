"""The built-in format: small architectures the store rebuilds from one safetensors file.

A stored model is weights plus a manifest naming one of these builders and
its config, so loading never unpickles code. Adding an architecture is adding
a function here; the registry of names is :data:`ARCHITECTURES`. torch is
imported inside the builders, so reading the names (the store validates
manifests with them) never imports torch into a worker's own process.

A built-in model enters the store from a module in memory (:func:`store`: its
``state_dict`` written as ``weights.safetensors``), as examples and
``hypha.train`` make them; its manifest is version 1 (``runtime`` ``builtin``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.base import Format, Imported, Target
from hypha_celery.formats.safe_files import sha256_file
from hypha_celery.manifest import WEIGHTS, Bad, FileEntry, Manifest, read_files

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ARCHITECTURES", "FORMAT", "TASKS", "build", "example_input_shape", "store"]

TASKS = ("classification", "regression")


def _int(config: Mapping[str, Any], name: str, default: int) -> int:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UnsupportedModel(f"architecture config {name!r} must be a positive integer, got {value!r}")
    return value


def mlp(config: Mapping[str, Any]) -> nn.Module:
    """Feature vector in, scores out: ``in_features -> hidden (ReLU) x layers -> out_features``."""
    from torch import nn

    in_features = _int(config, "in_features", 4)
    hidden = _int(config, "hidden", 16)
    layers = _int(config, "layers", 1)
    out_features = _int(config, "out_features", 3)
    modules: list[nn.Module] = []
    width = in_features
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    modules.append(nn.Linear(width, out_features))
    return nn.Sequential(*modules)


def cnn(config: Mapping[str, Any]) -> nn.Module:
    """A small image classifier: ``channels x size x size`` in, ``classes`` scores out."""
    from torch import nn

    channels = _int(config, "channels", 1)
    classes = _int(config, "classes", 10)
    width = _int(config, "width", 8)
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


ARCHITECTURES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {"mlp": mlp, "cnn": cnn}


def build(architecture: str, config: Mapping[str, Any], device: str = "cpu") -> nn.Module:
    """A module of ``architecture``; on ``"meta"`` it allocates nothing until weights are assigned."""
    import torch

    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        raise UnsupportedModel(f"unknown architecture {architecture!r} (known: {', '.join(sorted(ARCHITECTURES))})") from None
    with torch.device(device):
        return builder(config)


def example_input_shape(architecture: str, config: Mapping[str, Any]) -> list[int]:
    """The per-sample input shape a model of this architecture takes."""
    if architecture == "mlp":
        return [_int(config, "in_features", 4)]
    if architecture == "cnn":
        size = _int(config, "size", 28)
        return [_int(config, "channels", 1), size, size]
    raise UnsupportedModel(f"unknown architecture {architecture!r}")


def store(target: Target, module: nn.Module, model_id: str, *, architecture: str, config: dict[str, Any],
          input_shape: list[int], task: str = "classification", batchable: bool = True, parent: str | None = None,
          produced_by: dict[str, Any] | None = None) -> Imported:
    """Store ``module``'s weights as ``model_id``, a model of ``architecture`` built from ``config``."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in module.state_dict().items()}
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.") if state else "float32"
    with target.transaction(model_id) as new:
        weights = new.folder / WEIGHTS
        save_file(state, str(weights))
        manifest = Manifest(
            id=model_id, architecture=architecture, config=dict(config), input_shape=list(input_shape),
            files={WEIGHTS: FileEntry(sha256=sha256_file(weights), size=weights.stat().st_size)},
            dtype=dtype, task=task, batchable=batchable, parent=parent,
        )
        new.install(manifest, produced_by)
    return Imported(manifest, [])


def _manifest_fields(data: dict[str, Any], common: dict[str, Any], bad: Bad, max_size: int | None) -> dict[str, Any]:
    """A built-in manifest's own fields: a known architecture, its weights file, a task it can serve."""
    if not isinstance(data.get("architecture"), str) or data["architecture"] not in ARCHITECTURES:
        raise bad(f"names unknown architecture {data.get('architecture')!r}")
    files = read_files(data.get("files"), bad, max_size)
    if WEIGHTS not in files:
        raise bad(f"does not list {WEIGHTS}")
    if data.get("task", "classification") not in TASKS:
        raise bad(f"has unknown task {data.get('task')!r}")
    return {"architecture": data["architecture"], "files": files, "task": data.get("task", "classification"),
            "runtime": "builtin"}


def _check_fetched(folder: Path, manifest: Manifest) -> None:
    """Nothing beyond the hashes: a built-in manifest says nothing its weights file could contradict before loading."""


FORMAT = Format(runtime="builtin", manifest_fields=_manifest_fields, check_fetched=_check_fetched, store=store)
