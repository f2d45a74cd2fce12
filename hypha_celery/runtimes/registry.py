"""Which runtime serves a model: its manifest's ``runtime`` names one module, imported the first time it is used.

A runtime is a module with ``load(entry, device, *, trainable=False)`` (``entry``:
the store's verified handle, :meth:`~hypha_celery.models.store.ModelStore.open`;
returns the loaded model and its bytes; the loaded model has the ``manifest``
it came from) and ``infer_batch(loaded, items, per_item=None)``; one that
generates text adds ``generate(loaded, request, report, per_prompt=None)``
(:class:`Runtime`). A new runtime (GGUF, vLLM) is one module and one line of
:data:`RUNTIMES`, and a line in :data:`hypha_celery.formats.registry.FORMATS`.

Importing this module imports no runtime: torch, transformers and onnxruntime
are imported inside the executor, when a model of theirs is first loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from hypha_celery.errors import InvalidInput, UnsupportedModel

if TYPE_CHECKING:
    from hypha_celery.models.store import Entry
    from hypha_celery.work import Generate, Generation, Streamed

__all__ = ["RUNTIMES", "Runtime", "generate", "infer_batch", "load", "runtime"]

# A manifest's runtime -> the module that runs it.
RUNTIMES: dict[str, str] = {
    "builtin": "hypha_celery.runtimes.builtin",
    "onnx": "hypha_celery.runtimes.onnx",
    "transformers": "hypha_celery.runtimes.transformers",
}


class Runtime(Protocol):
    """What a runtime module provides (``generate`` too, where it generates text)."""

    def load(self, entry: Entry, device: str, *, trainable: bool = False) -> tuple[Any, int]: ...

    def infer_batch(self, loaded: Any, items: Sequence[Any], per_item: Sequence[Any] | None = None) -> list[Any]: ...


def runtime(name: str) -> Runtime:
    """The module of runtime ``name``, imported now if it was not yet."""
    module = RUNTIMES.get(name)
    if module is None:
        raise UnsupportedModel(f"runtime {name!r} is not one this worker has ({', '.join(sorted(RUNTIMES))})")
    return cast(Runtime, importlib.import_module(module))


def load(entry: Entry, device: str, *, trainable: bool = False) -> tuple[Any, int]:
    """Load the verified ``entry`` onto ``device`` with its runtime; returns the model and its size in bytes.

    ``trainable``: for the built-in runtime's own training; the others refuse it.
    """
    return runtime(entry.manifest.runtime).load(entry, device, trainable=trainable)


def infer_batch(loaded: Any, items: Sequence[Any], per_item: Sequence[Any] | None = None) -> list[Any]:
    """Answer every item of a batch with ``loaded``'s runtime.

    ``per_item``: each item's loaded model when the batch mixes adapters of one base.
    """
    return runtime(loaded.manifest.runtime).infer_batch(loaded, items, per_item)


def generate(loaded: Any, request: Generate, report: Callable[[Streamed], None],
             per_prompt: Sequence[Any] | None = None) -> Generation:
    """Generate for every prompt of ``request`` with ``loaded``'s runtime; one that does not generate refuses."""
    manifest = loaded.manifest
    run = getattr(runtime(manifest.runtime), "generate", None)
    if run is None:
        raise InvalidInput(f"model {manifest.id!r} is a {manifest.runtime} model: it does not generate text")
    return cast("Generation", run(loaded, request, report, per_prompt))
