"""Running stored Hugging Face models: safe loading, embeddings, text and image classification, generation.

Used inside executor processes only (importing it imports torch; transformers
is imported when a model loads). Loading never runs code that came with a
model: the class is the installed transformers' own, looked up by the
manifest's architecture only when the allow-list (:mod:`.hf_allowlist`) names
it; ``trust_remote_code=False``, safetensors only, local files only, offline
environment, and the directory transformers reads is a private view holding
only the files the manifest lists (each verified by the store) plus a
config.json we rewrote (``auto_map`` dropped; ``quantization_config`` and
``transformers_weights`` refused). Weights left missing by a load (transformers
would initialise them at random) make the model an error, not a model.

Pooling and normalisation of sentence-transformers models are read from their
``1_Pooling/config.json`` and ``modules.json`` and done here with torch ops;
no class named in ``modules.json`` is ever imported.

A LoRA adapter entry (``manifest.adapter_of``) is not loaded on its own: :func:`attach_adapter`
adds it to its loaded base (transformers' peft integration), so many adapters share one base
module; :func:`activate` selects the request's adapter (or none, for the base) before a pass.
A batch may mix requests for several adapters of one base (and the base itself): each row
then names its adapter in peft's mixed-batch LoRA forward (``adapter_names``, see
:class:`_RowAdapters`), so they share one pass.

Generation is transformers' own ``generate`` (no sampling code here): a
:class:`_Watch` stopping criterion, called after every token, notes the first
token's time, stops on a stop string, and reports the text so far.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hypha_celery.errors import InvalidInput, InvalidTask, UnsupportedModel, contained
from hypha_celery.models.hf_allowlist import (
    FEATURE_EXTRACTION,
    IMAGE_CLASSIFICATION,
    TEXT_CLASSIFICATION,
    TEXT_GENERATION,
    task_of,
)
from hypha_celery.models.manifest import CONFIG, Manifest, compute_dtype
from hypha_celery.models.store import ModelStore
from hypha_celery.models.tensors import MAX_IMAGE_PIXELS
from hypha_celery.models.text_inputs import TextBound, check_text, check_texts
from hypha_celery.protocol import Generate, Generated, Prompt, Streamed

__all__ = ["MAX_BATCH_ROWS", "MAX_BATCH_TOKENS", "Generation", "Pooling", "TransformerModel", "activate",
           "attach_adapter", "detach_adapter", "generate", "infer_batch", "load", "load_folder"]

# One forward pass holds at most this many texts, and this many (padded) tokens: bounds activation memory.
MAX_BATCH_ROWS = 64
MAX_BATCH_TOKENS = 16_384
MODULES = "modules.json"
POOLING = "1_Pooling/config.json"
# The sentence-transformers modules whose effect we implement; any other (Dense, ...) is refused.
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "lasttoken")
_REFUSED_CONFIG_KEYS = ("quantization_config", "transformers_weights")
# Image processors by model_type: the class is ours to name, never the preprocessor config's.
_IMAGE_PROCESSORS = {"vit": "ViTImageProcessorPil"}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def offline_environment(home: str | os.PathLike[str]) -> None:
    """Point the Hugging Face libraries at nothing: offline, a private home, no telemetry or progress bars.

    huggingface_hub reads these when it is first imported, so this runs before transformers is.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_HOME", str(Path(home) / "hf-home"))


@dataclass(frozen=True)
class Pooling:
    """How token embeddings become one text embedding (sentence-transformers' Pooling), and Normalize."""

    modes: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = False

    def apply(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, T, H] and ``mask`` [B, T] (right padding) -> [B, H x len(modes)], in float32."""
        hidden = hidden.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        counts = weights.sum(1).clamp(min=1e-9)
        parts = []
        for mode in self.modes:
            if mode == "cls_token":
                parts.append(hidden[:, 0])
            elif mode == "max_tokens":
                parts.append(hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(1))
            elif mode == "mean_tokens":
                parts.append((hidden * weights).sum(1) / counts)
            elif mode == "mean_sqrt_len_tokens":
                parts.append((hidden * weights).sum(1) / counts.sqrt())
            else:  # lasttoken: the last unmasked position of each row
                last = mask.sum(1).long().clamp(min=1) - 1
                parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        pooled = torch.cat(parts, dim=-1)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=-1) if self.normalize else pooled


@dataclass
class TransformerModel:
    """A loaded transformers model and what it needs to answer ``hypha.infer``."""

    module: Any
    manifest: Manifest
    device: torch.device
    task: str
    tokenizer: Any = None
    image_processor: Any = None
    pooling: Pooling | None = None
    max_length: int | None = None
    labels: list[str] | None = None
    multi_label: bool = False
    # A LoRA adapter attached to the (shared) base module: its peft name; None serves the base itself
    adapter: str | None = None
    adapter_id: str | None = None
    max_text_bytes: int | None = None  # the worker's bound on a text's bytes; None: from the manifest's max_length

    def text_bound(self) -> TextBound:
        """The most bytes one text may have before this model's tokenizer reads it (:mod:`.text_inputs`)."""
        return TextBound.of(self.manifest.id, self.manifest.max_length, self.max_text_bytes)


def load(store: ModelStore, model_id: str, device: str, *, dtype: str | None = None) -> tuple[TransformerModel, int]:
    """Verify ``model_id``'s files and load it onto ``device``; returns it and its real bytes.

    ``dtype``: the parameters' dtype (training asks for ``float32``); default :func:`compute_dtype`.
    """
    manifest, folder = store.verified_folder(model_id)  # checks every listed file's size and sha256
    return load_folder(folder, manifest, device, dtype=dtype)


def load_folder(folder: Path, manifest: Manifest, device: str, *, dtype: str | None = None
                ) -> tuple[TransformerModel, int]:
    """Load the (verified) model in ``folder`` through a private view of the manifest's files."""
    if manifest.runtime != "transformers":
        raise UnsupportedModel(f"model {manifest.id!r} is not a transformers model")
    if manifest.adapter_of is not None:
        raise UnsupportedModel(f"model {manifest.id!r} is a LoRA adapter of {manifest.adapter_of.id!r}, not a model: "
                               "it is attached to its loaded base (attach_adapter), never loaded alone")
    if task_of(manifest.model_type, manifest.architecture) != manifest.task:
        raise UnsupportedModel(
            f"model {manifest.id!r}: {manifest.model_type!r}/{manifest.architecture!r} is not on the allow-list"
        )
    if manifest.task not in (FEATURE_EXTRACTION, TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, TEXT_GENERATION):
        raise UnsupportedModel(f"model {manifest.id!r}: task {manifest.task!r} is not served by this worker")
    home = Path(tempfile.gettempdir())
    offline_environment(home)
    view = Path(tempfile.mkdtemp(prefix=f"hf-view-{manifest.id}-", dir=home))
    try:
        config = _private_view(folder, manifest, view)
        return _load_view(view, manifest, config, device, dtype or compute_dtype(device))
    finally:
        shutil.rmtree(view, ignore_errors=True)


def _private_view(folder: Path, manifest: Manifest, view: Path) -> dict[str, Any]:
    """Link each listed file into ``view`` and write the sanitised config.json; returns that config."""
    for name in manifest.files:
        if name == CONFIG:
            continue
        source = folder / name
        if source.is_symlink() or not source.is_file():
            raise UnsupportedModel(f"model {manifest.id!r}: {name} is not a regular file in the store")
        target = view / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve())
    config = _read_json(folder / CONFIG, manifest.id)
    refused = [key for key in _REFUSED_CONFIG_KEYS if key in config]
    if refused:
        raise UnsupportedModel(f"model {manifest.id!r}: config.json has {refused[0]!r}, which this worker refuses")
    config.pop("auto_map", None)
    if config.get("model_type") != manifest.model_type:
        raise UnsupportedModel(
            f"model {manifest.id!r}: config.json model_type {config.get('model_type')!r} is not the manifest's "
            f"{manifest.model_type!r}"
        )
    (view / CONFIG).write_text(json.dumps(config))
    return config


def _read_json(path: Path, model_id: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"model {model_id!r}: unreadable {path.name} ({exc})") from None
    if not isinstance(data, dict):
        raise UnsupportedModel(f"model {model_id!r}: {path.name} is not a JSON object")
    return data


def _transformers_class(manifest: Manifest) -> Any:
    """The installed transformers' own class named by the (allow-listed) architecture."""
    try:
        import transformers
    except ImportError:
        raise UnsupportedModel(f"model {manifest.id!r} needs transformers: install hypha-celery[hf]") from None

    cls = getattr(transformers, manifest.architecture, None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise UnsupportedModel(f"model {manifest.id!r}: transformers {transformers.__version__} has no "
                               f"model class {manifest.architecture!r}")
    return cls


def _load_view(view: Path, manifest: Manifest, raw_config: dict[str, Any], device: str, dtype_name: str
               ) -> tuple[TransformerModel, int]:
    cls = _transformers_class(manifest)
    dtype = _TORCH_DTYPES[dtype_name]
    config = cls.config_class.from_dict(raw_config)
    try:
        module, info = cls.from_pretrained(
            str(view), config=config, trust_remote_code=False, use_safetensors=True, local_files_only=True,
            output_loading_info=True, dtype=dtype,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise UnsupportedModel(f"model {manifest.id!r} could not be loaded: {exc}") from None
    missing = sorted(key for key in info.get("missing_keys", ()) if not _unused_head(manifest, key))
    mismatched = sorted(str(key) for key in info.get("mismatched_keys", ()))
    if missing or mismatched:
        names = (missing or mismatched)[:10]
        raise UnsupportedModel(
            f"model {manifest.id!r}: the checkpoint {'lacks' if missing else 'has mismatched shapes for'} "
            f"{len(missing or mismatched)} weight(s) ({', '.join(names)}); transformers would have initialised "
            "them at random, so it is refused"
        )
    module.to(torch.device(device))
    module.eval()
    module.requires_grad_(False)
    model = TransformerModel(module=module, manifest=manifest, device=torch.device(device), task=manifest.task)
    if manifest.task == IMAGE_CLASSIFICATION:
        model.image_processor = _image_processor(view, manifest)
    else:
        model.tokenizer = _tokenizer(view, manifest)
        model.max_length = _max_length(manifest, model.tokenizer, raw_config)
    if manifest.task == FEATURE_EXTRACTION:
        model.pooling = _pooling(view, manifest)
    elif manifest.task == TEXT_GENERATION:
        pass  # the tokenizer (and its chat template) is all generation needs beside the module
    else:
        model.labels = _labels(module.config, manifest)
        model.multi_label = getattr(module.config, "problem_type", None) == "multi_label_classification"
    return model, module_bytes(module)


def attach_adapter(base: TransformerModel, store: ModelStore, adapter_id: str) -> tuple[TransformerModel, int]:
    """Attach the stored LoRA adapter ``adapter_id`` to the loaded ``base`` (its module is shared, not copied).

    The adapter must name this base by id and by its manifest's sha256; its two files are
    verified and read through a private view, like a model's. Returns the adapter's view of
    the model (:func:`activate` selects it before each pass) and the adapter's own bytes.
    """
    manifest, folder = store.verified_folder(adapter_id)
    if manifest.adapter_of is None:
        raise UnsupportedModel(f"model {adapter_id!r} is not an adapter")
    if manifest.adapter_of.id != base.manifest.id or manifest.adapter_of.sha256 != store.manifest_sha256(base.manifest.id):
        raise UnsupportedModel(f"adapter {adapter_id!r} was trained on another {manifest.adapter_of.id!r} (its "
                               "manifest sha256 differs from the stored base's); refusing to attach it")
    name = "hypha_" + hashlib.sha256(adapter_id.encode()).hexdigest()[:16]  # peft names cannot hold '.'
    home = Path(tempfile.gettempdir())
    view = Path(tempfile.mkdtemp(prefix=f"hf-view-{adapter_id}-", dir=home))
    module = base.module
    before = _parameter_bytes(module)
    try:
        for file in manifest.files:
            (view / file).symlink_to((folder / file).resolve())
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


class _RowAdapters:
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
    def installed(self) -> Iterator[_RowAdapters]:
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
def _selected(model: TransformerModel, per_row: Sequence[TransformerModel] | None) -> Iterator[_RowAdapters | None]:
    """Select the adapter for a pass: ``model``'s, or with ``per_row`` naming different adapters of one base, each
    row's own (yields the :class:`_RowAdapters` to set per pass)."""
    names = {view.adapter for view in per_row or ()}
    if len(names) <= 1:
        activate(per_row[0] if per_row else model)
        yield None
        return
    if any(view.module is not model.module for view in per_row or ()):
        raise UnsupportedModel(f"a mixed batch must hold adapters of one loaded base ({model.manifest.id!r})")
    first = next(view for view in per_row or () if view.adapter is not None)
    activate(first)  # adapters enabled; each row's own is named in the pass
    with _RowAdapters(model.module).installed() as rows:
        yield rows


def _row_name(view: TransformerModel) -> str:
    return view.adapter if view.adapter is not None else _BASE_ROW


def _parameter_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _unused_head(manifest: Manifest, key: str) -> bool:
    """An embedding model's pooler: sentence-transformers checkpoints often omit it, and it is never used."""
    return manifest.task == FEATURE_EXTRACTION and key.split(".")[0] == "pooler"


def module_bytes(module: torch.nn.Module) -> int:
    """The model's real memory: parameters and buffers, on whatever device they live."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _tokenizer(view: Path, manifest: Manifest) -> Any:
    """The fast tokenizer from ``tokenizer.json``: a fixed class, never one the model's files name."""
    if "tokenizer.json" not in manifest.files:
        raise UnsupportedModel(f"model {manifest.id!r} has no tokenizer.json (only fast tokenizers are supported)")
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(view), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"model {manifest.id!r}: tokenizer could not be loaded: {exc}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UnsupportedModel(f"model {manifest.id!r}: its tokenizer has no padding token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _max_length(manifest: Manifest, tokenizer: Any, config: dict[str, Any]) -> int:
    """The manifest's max_length, else the smallest of the tokenizer's and the position embeddings'."""
    if manifest.max_length:
        return manifest.max_length
    known = [value for value in (getattr(tokenizer, "model_max_length", None), config.get("max_position_embeddings"))
             if isinstance(value, int) and 0 < value < 1_000_000]
    return min(known, default=512)


def _pooling(view: Path, manifest: Manifest) -> Pooling:
    """Pooling and normalisation from the sentence-transformers files; mean pooling without them."""
    normalize = False
    if MODULES in manifest.files:
        modules = json.loads((view / MODULES).read_text())
        if not isinstance(modules, list):
            raise UnsupportedModel(f"model {manifest.id!r}: modules.json is not a list")
        for module in modules:
            kind = module.get("type") if isinstance(module, dict) else None
            if kind == _ST_NORMALIZE:
                normalize = True
            elif kind not in (_ST_TRANSFORMER, _ST_POOLING):
                raise UnsupportedModel(f"model {manifest.id!r}: sentence-transformers module {kind!r} is not supported "
                                       "(only Transformer, Pooling and Normalize)")
    if POOLING not in manifest.files:
        return Pooling(normalize=normalize)
    config = json.loads((view / POOLING).read_text())
    if not isinstance(config, dict):
        raise UnsupportedModel(f"model {manifest.id!r}: {POOLING} is not a JSON object")
    unsupported = [key for key, value in config.items()
                   if key.startswith("pooling_mode_") and value is True and key.removeprefix("pooling_mode_")
                   not in _POOLING_MODES]
    if unsupported:
        raise UnsupportedModel(f"model {manifest.id!r}: pooling {unsupported[0]!r} is not supported")
    modes = tuple(mode for mode in _POOLING_MODES if config.get(f"pooling_mode_{mode}") is True)
    if not modes:
        raise UnsupportedModel(f"model {manifest.id!r}: {POOLING} enables no pooling mode")
    return Pooling(modes=modes, normalize=normalize)


def _labels(config: Any, manifest: Manifest) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(len(id2label))] if id2label else None
    return labels or list(manifest.labels or [])


def _image_processor(view: Path, manifest: Manifest) -> Any:
    name = _IMAGE_PROCESSORS.get(manifest.model_type or "")
    if name is None or "preprocessor_config.json" not in manifest.files:
        raise UnsupportedModel(f"model {manifest.id!r}: no image processor for model_type {manifest.model_type!r}")
    import transformers

    cls = getattr(transformers, name)
    config = _read_json(view / "preprocessor_config.json", manifest.id)
    config.pop("auto_map", None)
    config.pop("image_processor_type", None)
    config.pop("processor_class", None)
    return cls(**config)


# --- inference -------------------------------------------------------------------------------------


def infer_batch(model: TransformerModel, items: Sequence[Any], per_item: Sequence[TransformerModel] | None = None
                ) -> list[Any]:
    """Answer each item (``{"texts": [...]}`` or ``{"images": [...]}``) of a batch of requests.

    Every text (or image) of every item runs in passes sorted by length, so
    padding stays small; each item gets its own results back, in order.
    ``per_item``: each item's model when the batch mixes adapters of ``model``'s base.
    """
    if model.task == TEXT_GENERATION:
        if items and all(isinstance(item, dict) and set(item) == {"verify"} for item in items):
            from hypha_celery.models import proof_runtime  # hypha.verify: a prefill replays a generation

            return [proof_runtime.verify(per_item[i] if per_item else model, item["verify"])
                    for i, item in enumerate(items)]
        raise InvalidTask(f"model {model.manifest.id!r} generates text: send it hypha.generate, not hypha.infer")
    with _selected(model, per_item) as mixed:
        return _infer(model, items, per_item, mixed)


def _infer(model: TransformerModel, items: Sequence[Any], per_item: Sequence[TransformerModel] | None,
           mixed: _RowAdapters | None) -> list[Any]:
    key = "images" if model.task == IMAGE_CLASSIFICATION else "texts"
    flat: list[Any] = []
    owners: list[int] = []
    for index, item in enumerate(items):
        values = item.get(key) if isinstance(item, dict) else None
        if not isinstance(values, list) or not values:
            raise InvalidInput(f"model {model.manifest.id!r} ({model.task}) takes {key!r}")
        flat.extend(values)
        owners.extend([index] * len(values))
    names = [_row_name(per_item[owner]) for owner in owners] if mixed is not None and per_item else None
    rows = _images(model, flat, mixed, names) if key == "images" else _texts(model, flat, mixed, names)
    results: list[list[Any]] = [[] for _ in items]
    for owner, row in zip(owners, rows, strict=True):
        results[owner].append(row)
    if model.task == FEATURE_EXTRACTION:
        return [{"embeddings": rows_of, "dim": len(rows_of[0])} for rows_of in results]
    return results


def _texts(model: TransformerModel, texts: list[str], mixed: _RowAdapters | None = None,
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


def _images(model: TransformerModel, images: list[str], mixed: _RowAdapters | None = None,
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


@dataclass(frozen=True)
class Generation:
    """What one generation job produced: per prompt a :class:`Generated` or the error that refused it."""

    outputs: list[Generated | Exception]
    time_to_first_token_s: float
    compute_s: float


class _Watch:
    """A transformers ``StoppingCriteria`` (duck-typed: called after each token with the ids so far).

    Per row of the batch it notes where the row ended (its end-of-sequence
    token, or a stop string in its decoded text) and stops that row; it times the
    first token and reports each live row's text at most every ``interval`` seconds, with the token
    ids since its previous report (``sent``: how many of a row's tokens were reported).
    Rows are decoded only when a stop string must be looked for or a report is due.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, indices: Sequence[int], stop: Sequence[str],
                 interval: float, report: Callable[[Streamed], None]) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.indices = list(indices)
        self.stop = tuple(stop)
        self.interval = interval
        self.report = report
        self.eos = tokenizer.eos_token_id
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.ended_at: list[int | None] = [None] * len(self.indices)
        self.sent = [0] * len(self.indices)
        self._last_report = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        now = time.perf_counter()
        if self.first_token_s is None:
            self.first_token_s = now - self.started
        generated = input_ids[:, self.prompt_width:]
        length = int(generated.shape[1])
        due = now - self._last_report >= self.interval
        if due:
            self._last_report = now
        for row, ended in enumerate(self.ended_at):
            if ended is not None:
                continue
            if self.eos is not None and int(generated[row, -1]) == self.eos:
                self.ended_at[row] = length
            if not (self.stop or due):
                continue
            text = self.tokenizer.decode(generated[row], skip_special_tokens=True)
            if any(stop in text for stop in self.stop):
                self.ended_at[row] = length
            if due:
                self.finish(row, visible(text, self.stop), generated[row, :length].tolist())
        return torch.tensor([ended is not None for ended in self.ended_at], dtype=torch.bool, device=input_ids.device)

    def finish(self, row: int, text: str, ids: Sequence[int]) -> None:
        """Report row ``row``'s ``text`` so far and its tokens ``ids`` (all of them; those not yet sent go)."""
        start = self.sent[row]
        self.sent[row] = len(ids)
        self.report(Streamed(text=text, tokens=len(ids), index=self.indices[row], ids=list(ids[start:]), start=start,
                             at=time.time()))


def visible(text: str, stop: Sequence[str]) -> str:
    """What a client may see of unfinished text: a prefix of the final text.

    Cut at a stop string, hold back a tail that may become one, and drop a
    trailing replacement character (a multi-byte character whose bytes are still arriving).
    """
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        return text[:min(cuts)]
    hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[:len(text) - hold].rstrip("\ufffd")


def _prompt_ids(model: TransformerModel, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """A prompt's token ids (chat messages rendered with the model's template), checked against its length."""
    tokenizer = model.tokenizer
    bound = model.text_bound()  # before the tokenizer: validation's checks, once more
    if prompt.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidTask(f"model {model.manifest.id!r} has no chat template: send a prompt, not messages")
        contents = [message.get("content", "") for message in prompt.messages]
        check_texts(contents, "messages' content")
        check_text("".join(contents), "messages' contents together", bound)
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        check_text(prompt.prompt or "", "prompt", bound)
        ids = tokenizer(prompt.prompt)["input_ids"]
    limit = model.max_length or len(ids) + max_new_tokens
    if len(ids) + max_new_tokens > limit:
        raise InvalidInput(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) "
                           f"exceeds the model's maximum length ({limit} tokens)")
    return list(ids)


def generate(model: TransformerModel, request: Generate, report: Callable[[Streamed], None],
             per_prompt: Sequence[TransformerModel] | None = None) -> Generation:
    """Generate for every prompt of ``request`` in one batch with transformers' ``generate``.

    Prompts are left-padded to one width (the attention mask hides the padding),
    so each row's greedy text equals what it generates alone. A prompt that is
    refused (too long, messages without a chat template) gets its error; the
    others still run. ``report`` gets each row's text as it grows. ``per_prompt``:
    each prompt's model when the batch mixes adapters of ``model``'s base.
    """
    with _selected(model, per_prompt) as mixed:
        return _generate(model, request, report, per_prompt, mixed)


def _generate(model: TransformerModel, request: Generate, report: Callable[[Streamed], None],
              per_prompt: Sequence[TransformerModel] | None, mixed: _RowAdapters | None) -> Generation:
    from transformers import GenerationConfig, StoppingCriteriaList

    from hypha_celery.models import proof_runtime

    if model.task != TEXT_GENERATION:
        raise InvalidTask(f"model {model.manifest.id!r} does not generate text ({model.task})")
    params = request.params
    tokenizer = model.tokenizer
    outputs: list[Generated | Exception | None] = [None] * len(request.prompts)
    rows: list[tuple[int, list[int]]] = []
    for index, prompt in enumerate(request.prompts):
        try:
            rows.append((index, _prompt_ids(model, prompt, params["max_new_tokens"])))
        except BaseException as exc:  # refused, or what the tokenizer raised (a panic too): this prompt fails alone
            if not contained(exc):
                raise
            outputs[index] = exc if isinstance(exc, Exception) else RuntimeError(f"{type(exc).__name__}: {exc}")
    if not rows:
        return Generation([o for o in outputs if o is not None], 0.0, 0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(ids) for _, ids in rows)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in rows])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in rows])
    sampling = {key: params[key] for key in ("temperature", "top_p", "top_k")} if params["do_sample"] else {}
    config = GenerationConfig(
        max_new_tokens=params["max_new_tokens"], do_sample=params["do_sample"],
        repetition_penalty=params["repetition_penalty"], pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id, **sampling,
    )
    if params["seed"] is not None:
        torch.manual_seed(params["seed"])
    watch = _Watch(tokenizer, width, [index for index, _ in rows], params["stop"], request.progress_interval, report)
    if mixed is not None and per_prompt is not None:
        mixed.rows = [_row_name(per_prompt[index]) for index, _ in rows]
    started = time.perf_counter()
    with ExitStack() as stack:
        states = stack.enter_context(proof_runtime.capture(model)) if params.get("proof") else None
        with torch.inference_mode():
            output = model.module.generate(
                input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                generation_config=config, stopping_criteria=StoppingCriteriaList([watch]),
            )
    compute_s = time.perf_counter() - started
    kept = [output[row, width:][:watch.ended_at[row]] if watch.ended_at[row] is not None else output[row, width:]
            for row in range(len(rows))]
    proved = proof_runtime.prove_rows(model, states, [new.tolist() for new in kept]) if states is not None else None
    for row, (index, ids) in enumerate(rows):
        new, ended = kept[row], watch.ended_at[row]
        text = tokenizer.decode(new, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in params["stop"] if stop in text]
        if cuts:
            text = text[:min(cuts)]
        finish = "stop" if ended is not None or new.numel() < params["max_new_tokens"] else "length"
        outputs[index] = Generated(text=text, finish_reason=finish, prompt_tokens=len(ids),
                                   completion_tokens=int(new.numel()), proof=proved[row] if proved else None)
        watch.finish(row, text, new.tolist())  # the final text, and the tokens since the last report
    first = watch.first_token_s if watch.first_token_s is not None else compute_s
    return Generation([o for o in outputs if o is not None], first, compute_s)
