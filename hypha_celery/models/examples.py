"""Small example models, written locally (no downloads): ``mlp`` and ``cnn``.

``mlp`` takes 4 features and gives 3 class scores; it is fitted briefly on
:func:`clusters`, a seeded synthetic data set of three Gaussian blobs, so its
answers mean something. ``cnn`` takes a 1x28x28 image and gives 10 scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hypha_celery.models.manifest import Manifest
from hypha_celery.models.store import ModelStore

if TYPE_CHECKING:
    import torch

__all__ = ["clusters", "init_examples"]

_CENTRES = ((5.0, 3.4, 1.5, 0.2), (5.9, 2.8, 4.3, 1.3), (6.6, 3.0, 5.6, 2.0))


def clusters(n: int = 150, seed: int = 0) -> tuple[list[list[float]], list[int]]:
    """``n`` rows of 4 features around three centres, and their class (0, 1, 2)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.tensor(_CENTRES)[labels]
    rows = centres + 0.35 * torch.randn(n, 4, generator=generator)
    return [[round(v, 4) for v in row] for row in rows.tolist()], labels.tolist()


def init_examples(model_dir: str | Path, *, overwrite: bool = False) -> list[Manifest]:
    """Write the example models into ``model_dir``; existing ones are kept unless ``overwrite``."""
    import shutil

    import torch

    from hypha_celery.models.architectures import build, example_input_shape

    store = ModelStore(model_dir)
    written = []
    for name, config in (("mlp", {"in_features": 4, "hidden": 16, "out_features": 3}),
                         ("cnn", {"channels": 1, "size": 28, "classes": 10, "width": 8})):
        if store.has(name):
            if not overwrite:
                written.append(store.manifest(name))
                continue
            shutil.rmtree(store.path(name))
        torch.manual_seed(0)
        module = build(name, config)
        if name == "mlp":
            _fit(module)
        written.append(store.save(name, module, architecture=name, config=config,
                                  input_shape=example_input_shape(name, config)))
    return written


def _fit(module: torch.nn.Module) -> None:
    import torch

    rows, labels = clusters()
    inputs, targets = torch.tensor(rows), torch.tensor(labels)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(inputs), targets)
        loss.backward()
        optimizer.step()
