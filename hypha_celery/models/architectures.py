"""Model architectures the store can rebuild from safetensors weights.

A stored model is weights plus a manifest naming one of these builders and
its config, so loading never unpickles code. Adding an architecture is adding
a function here; the registry of names is :data:`ARCHITECTURES`. torch is
imported inside the builders, so reading the names (the store validates
manifests with them) never imports torch into a worker's own process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hypha_celery.errors import UnsupportedModel

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ARCHITECTURES", "build", "example_input_shape"]


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
