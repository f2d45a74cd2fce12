"""The transformers runtime's LoRA adapters: many adapters on one loaded base, and batches that mix them.

A LoRA adapter entry (``manifest.adapter_of``) is not loaded on its own: :func:`attach_adapter`
adds it to its loaded base (transformers' peft integration), so many adapters share one base
module; :func:`activate` selects the request's adapter (or none, for the base) before a pass.
A batch may mix requests for several adapters of one base (and the base itself): each row
then names its adapter in peft's mixed-batch LoRA forward (``adapter_names``, see
:class:`RowAdapters`), so they share one pass (:func:`selected` picks either way).
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.models.store import Entry
from hypha_celery.runtimes.transformers_loading import TransformerModel

__all__ = ["RowAdapters", "activate", "attach_adapter", "detach_adapter", "row_name", "selected"]


def attach_adapter(base: TransformerModel, adapter: Entry) -> tuple[TransformerModel, int]:
    """Attach the stored LoRA adapter ``adapter`` (verified) to the loaded ``base`` (its module is shared, not copied).

    The adapter must name this base by id and by the sha256 of the manifest it was loaded from; its
    two files are read through a private view, like a model's. Returns the adapter's view of
    the model (:func:`activate` selects it before each pass) and the adapter's own bytes.
    """
    manifest, adapter_id = adapter.manifest, adapter.id
    if manifest.adapter_of is None:
        raise UnsupportedModel(f"model {adapter_id!r} is not an adapter")
    if manifest.adapter_of.id != base.manifest.id or manifest.adapter_of.sha256 != base.sha256:
        raise UnsupportedModel(f"adapter {adapter_id!r} was trained on another {manifest.adapter_of.id!r} (its "
                               "manifest sha256 differs from the stored base's); refusing to attach it")
    name = "hypha_" + hashlib.sha256(adapter_id.encode()).hexdigest()[:16]  # peft names cannot hold '.'
    home = Path(tempfile.gettempdir())
    view = Path(tempfile.mkdtemp(prefix=f"hf-view-{adapter_id}-", dir=home))
    module = base.module
    before = _parameter_bytes(module)
    try:
        for file, path in adapter.files().items():
            (view / file).symlink_to(path.resolve())
        with warnings.catch_warnings():  # peft warns that a model holds several adapters: that is the point
            warnings.filterwarnings("ignore", message=".*peft_config.*", category=UserWarning)
            module.load_adapter(str(view), adapter_name=name)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UnsupportedModel(f"adapter {adapter_id!r} could not be attached to {base.manifest.id!r}: {exc}") from None
    finally:
        shutil.rmtree(view, ignore_errors=True)
    module.requires_grad_(False)
    module.eval()
    attached = dataclasses.replace(base, adapter=name, adapter_id=adapter_id)
    return attached, max(1, _parameter_bytes(module) - before)


def detach_adapter(model: TransformerModel) -> None:
    """Remove ``model``'s adapter from the shared base module (the adapter left the cache)."""
    if model.adapter is not None and getattr(model.module, "_hf_peft_config_loaded", False):
        model.module.delete_adapter(model.adapter)


def activate(model: TransformerModel) -> None:
    """Select ``model``'s adapter on the shared base module before a pass, or no adapter for the base itself."""
    module = model.module
    if not getattr(module, "_hf_peft_config_loaded", False):
        if model.adapter is not None:
            raise UnsupportedModel(f"adapter {model.adapter_id!r} is no longer attached to its base")
        return
    if model.adapter is None:
        module.disable_adapters()
    else:
        module.enable_adapters()
        _enable_saved_modules(module)
        module.set_adapter(model.adapter)


def _enable_saved_modules(module: Any) -> None:
    """Enable peft's ``modules_to_save`` copies (a LoRA classifier's own head) again.

    transformers 5's ``disable_adapters`` disables them, but its ``enable_adapters`` only
    re-enables the LoRA layers: after one request for the base, every adapter would answer
    with the base's classification head.
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    for layer in module.modules():
        if isinstance(layer, AuxiliaryTrainingWrapper) and layer.disable_adapters:
            layer.enable_adapters(True)


_BASE_ROW = "__base__"  # peft's name for a row of a mixed batch that runs without an adapter


class RowAdapters:
    """Which adapter each row of the next pass uses, on the base module all of them share.

    peft's LoRA layers and ``modules_to_save`` wrappers take ``adapter_names`` (one per row)
    in ``forward`` and run each row's own low-rank update on top of one base pass; PeftModel
    injects the argument with forward pre-hooks, and so do we, since the adapters hang on
    transformers' own module. ``rows`` is set before each pass (a text batch runs in chunks).
    """

    def __init__(self, module: Any) -> None:
        self.module = module
        self.rows: list[str] = []

    def hook(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs["adapter_names"] = self.rows
        return args, kwargs

    @contextmanager
    def installed(self) -> Iterator[RowAdapters]:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        layers: list[Any] = [layer for layer in self.module.modules()
                             if isinstance(layer, (LoraLayer, AuxiliaryTrainingWrapper))]
        handles = [layer.register_forward_pre_hook(self.hook, with_kwargs=True) for layer in layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def selected(model: TransformerModel, per_row: Sequence[TransformerModel] | None) -> Iterator[RowAdapters | None]:
    """Select the adapter for a pass: ``model``'s, or with ``per_row`` naming different adapters of one base, each
    row's own (yields the :class:`RowAdapters` to set per pass)."""
    names = {view.adapter for view in per_row or ()}
    if len(names) <= 1:
        activate(per_row[0] if per_row else model)
        yield None
        return
    if any(view.module is not model.module for view in per_row or ()):
        raise UnsupportedModel(f"a mixed batch must hold adapters of one loaded base ({model.manifest.id!r})")
    first = next(view for view in per_row or () if view.adapter is not None)
    activate(first)  # adapters enabled; each row's own is named in the pass
    with RowAdapters(model.module).installed() as rows:
        yield rows


def row_name(view: TransformerModel) -> str:
    """What a row of a mixed batch names: its adapter, or peft's name for the base."""
    return view.adapter if view.adapter is not None else _BASE_ROW


def _parameter_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
