"""The formats the store knows, by the manifest's ``runtime``: the one table the store looks a format up in.

A new format (GGUF, say) is a module beside these ending in its :class:`~.base.Format`, and one entry
in :data:`FORMATS`. :func:`read_manifest` reads a model manifest that may come from anywhere: the
fields every manifest has (:mod:`hypha_celery.manifest`), then its format's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats import builtin, huggingface, onnx
from hypha_celery.formats.base import Format
from hypha_celery.manifest import Manifest, manifest_error, read_common, read_runtime

__all__ = ["FORMATS", "RUNTIMES", "format_of", "read_manifest"]

FORMATS: Mapping[str, Format] = MappingProxyType({
    fmt.runtime: fmt for fmt in (builtin.FORMAT, huggingface.FORMAT, onnx.FORMAT)
})
RUNTIMES = tuple(FORMATS)


def format_of(runtime: str) -> Format:
    """The format whose models ``runtime`` loads; ``UnsupportedModel`` naming the known ones otherwise."""
    try:
        return FORMATS[runtime]
    except KeyError:
        raise UnsupportedModel(f"unknown model format {runtime!r} (known: {', '.join(RUNTIMES)})") from None


def read_manifest(data: Any, model_id: str, max_size: int | None = None) -> Manifest:
    """Validate a model manifest (it may come from a remote source) field by field, its format's fields too."""
    runtime = read_runtime(data, model_id)
    fmt = FORMATS.get(runtime)
    if fmt is None:
        raise manifest_error(model_id)(f"has unknown runtime {runtime!r}")
    common = read_common(data, model_id, shapeless=fmt.shapeless)
    return Manifest(**common, **fmt.manifest_fields(data, common, manifest_error(model_id), max_size))
