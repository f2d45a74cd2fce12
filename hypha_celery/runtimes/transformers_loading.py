"""The transformers runtime's loading: a stored Hugging Face model, loaded without running its code.

Used inside executor processes only (importing it imports torch; transformers
is imported when a model loads). Loading never runs code that came with a
model: the class is the installed transformers' own, looked up by the
manifest's architecture only when the allow-list
(:mod:`hypha_celery.formats.huggingface`) names it; ``trust_remote_code=False``,
safetensors only, local files only, offline environment, and the directory
transformers reads is a private view holding only the files the manifest lists
(each verified by the store) plus a config.json we rewrote (``auto_map``
dropped; ``quantization_config`` and ``transformers_weights`` refused). Weights
left missing by a load (transformers would initialise them at random) make the
model an error, not a model.

Pooling and normalisation of sentence-transformers models are read from their
``1_Pooling/config.json`` and ``modules.json`` here, and applied with torch ops
(:meth:`Pooling.apply`); no class named in ``modules.json`` is ever imported.
What a loaded model then does is in :mod:`.transformers_encoders` (embeddings,
classes), :mod:`.transformers_generation` and :mod:`.transformers_adapters` (LoRA).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.huggingface import (
    FEATURE_EXTRACTION,
    IMAGE_CLASSIFICATION,
    TEXT_CLASSIFICATION,
    TEXT_GENERATION,
    task_of,
)
from hypha_celery.manifest import CONFIG, Manifest, compute_dtype
from hypha_celery.models.store import Entry
from hypha_celery.models.text_inputs import TextBound

__all__ = ["Pooling", "TransformerModel", "load", "module_bytes", "offline_environment"]

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
    grammars: Any = None  # structured output's view of the tokenizer (structured.grammar.Grammars), at first use
    sha256: str | None = None  # the stored manifest's digest (Entry.sha256): an adapter attaches only to its base

    def text_bound(self) -> TextBound:
        """The most bytes one text may have before this model's tokenizer reads it (:mod:`.text_inputs`)."""
        return TextBound.of(self.manifest.id, self.manifest.max_length, self.max_text_bytes)


def load(entry: Entry, device: str, *, dtype: str | None = None) -> tuple[TransformerModel, int]:
    """Load the verified ``entry`` (every listed file's size and sha256 checked by the store) onto ``device``
    through a private view of its files; returns it and its real bytes.

    ``dtype``: the parameters' dtype (training asks for ``float32``); default :func:`compute_dtype`.
    """
    manifest = entry.manifest
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
        config = _private_view(entry, view)
        model, size = _load_view(view, manifest, config, device, dtype or compute_dtype(device))
    finally:
        shutil.rmtree(view, ignore_errors=True)
    model.sha256 = entry.sha256
    return model, size


def _private_view(entry: Entry, view: Path) -> dict[str, Any]:
    """Link each listed file into ``view`` and write the sanitised config.json; returns that config."""
    manifest = entry.manifest
    for name, source in entry.files().items():
        if name == CONFIG:
            continue
        if source.is_symlink() or not source.is_file():
            raise UnsupportedModel(f"model {manifest.id!r}: {name} is not a regular file in the store")
        target = view / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve())
    config = _read_json(entry.file(CONFIG), manifest.id)
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
