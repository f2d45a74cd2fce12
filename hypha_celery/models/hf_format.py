"""Check a local Hugging Face model directory before it enters the store, without importing torch or transformers.

:func:`scan` walks the directory and sorts every file: refused (the whole
import is refused: loading could run code that came with the model),
copied (on the allow-list, :data:`~hypha_celery.models.manifest.HF_FILES`) or
skipped (harmless and unused: README.md, vocab.txt, .gitattributes, ...).
:func:`describe` reads the copied files (config, safetensors headers,
tokenizer settings) into the manifest's version-2 fields. :func:`clean_config`
refuses config keys that make transformers load something else and drops
``auto_map``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.models.hf_allowlist import ALLOWED, TEXT_GENERATION, task_of
from hypha_celery.models.manifest import CONFIG, DTYPE_BYTES, Manifest, ModelMemory, is_hf_file
from hypha_celery.models.safe_files import open_regular, walk
from hypha_celery.models.safetensors_header import Checkpoint, read_checkpoint, read_header

__all__ = ["Scan", "check_adapter", "check_fetched", "check_fetched_adapter", "clean_config", "describe", "identify",
           "read_config", "scan"]

_PICKLE = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PICKLE_RISK = ("is a pickle (or TorchScript) file: unpickling runs code, and torch's weights_only loading "
                "has been bypassed (CVE-2025-32434, CVE-2026-24747)")
_WHY_PICKLE = f"{_PICKLE_RISK}; convert the weights to safetensors"
_REFUSED_SUFFIXES = {
    **dict.fromkeys(_PICKLE, _WHY_PICKLE),
    ".pt2": "is a torch.export archive: its loader unpickles constants and custom objects",
    ".jit": "is TorchScript: its loader has no safe mode",
    ".torchscript": "is TorchScript: its loader has no safe mode",
    ".py": "is Python code shipped with the model; the worker never runs a model's own code",
    ".pyc": "is compiled Python shipped with the model; the worker never runs a model's own code",
}
_ADAPTER = ("adapter_config.json", "adapter_model.safetensors")
_WHY_ADAPTER = ("is a LoRA/PEFT adapter, not a full model: transformers would download and load the base model "
                "its uploader named (base_model_name_or_path); import the base model itself")
_REFUSED_CONFIG = {
    "quantization_config": "quantised checkpoints load through third-party kernels and are not supported",
    "transformers_weights": "names a weights file of its own choosing, which may be a pickle",
}
_DROPPED_CONFIG = ("auto_map",)  # points at *.py in the uploader's repository
_NO_LIMIT = 10**18  # tokenizers write int(1e30) as model_max_length when they have no limit
_JSON_CAP = 16 * 2**20


@dataclass
class Scan:
    """A directory, sorted: the files to copy (with their sizes), the files skipped (relative paths)."""

    copy: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """The bytes the files to copy held when they were scanned: what the size cap is checked against first."""
        return sum(self.sizes.values())


def scan(directory: Path) -> Scan:
    """Sort every file under ``directory``; raise ``UnsupportedModel`` naming each refused file and why.

    Links and other non-regular entries refuse the whole import (:func:`.safe_files.walk`), skipped ones too:
    nothing in the folder may point outside it.
    """
    if not directory.is_dir():
        raise UnsupportedModel(f"{directory} is not a directory")
    walked = walk(directory, skip=frozenset({".git"}))  # a clone's history: not part of the model
    result, refused = Scan(skipped=list(walked.skipped)), []
    for relative, size in walked.files.items():
        why = _refusal(relative.rpartition("/")[2])
        if why is not None:
            refused.append(f"{relative} {why}")
        elif is_hf_file(relative):
            result.copy.append(relative)
            result.sizes[relative] = size
        else:
            result.skipped.append(relative)
    if refused:
        raise UnsupportedModel(f"{directory}: refused: " + "; ".join(_beside_safetensors(refused, result.copy)))
    if CONFIG not in result.copy:
        raise UnsupportedModel(f"{directory}: no {CONFIG}; not a Hugging Face model directory")
    return result


def _beside_safetensors(refused: list[str], kept: list[str]) -> list[str]:
    """The refusals, a pickle's reworded where safetensors weights sit beside it: nothing needs converting then."""
    weights = [name for name in kept if name.endswith(".safetensors")]
    if not weights:
        return refused
    instead = (f"{_PICKLE_RISK}; this folder already has the weights as {', '.join(weights)}: "
               "delete the pickle (or copy the folder without it) and import again")
    return [line.replace(_WHY_PICKLE, instead) for line in refused]


def _refusal(name: str) -> str | None:
    if name in _ADAPTER:
        return _WHY_ADAPTER
    lowered = name.lower()
    for suffix, why in _REFUSED_SUFFIXES.items():
        if lowered.endswith(suffix):
            return why
    return None


def clean_config(config: Any) -> tuple[dict[str, Any], list[str]]:
    """``config.json`` without the keys we drop, and which were dropped; refused keys raise."""
    if not isinstance(config, dict):
        raise UnsupportedModel(f"{CONFIG} is not a JSON object")
    for key, why in _REFUSED_CONFIG.items():
        if key in config:
            raise UnsupportedModel(f"{CONFIG} has {key!r}: {why}")
    dropped = [key for key in _DROPPED_CONFIG if key in config]
    return {key: value for key, value in config.items() if key not in dropped}, dropped


def read_config(directory: Path) -> dict[str, Any]:
    """``directory/config.json`` as a JSON object (size capped)."""
    return _read_json(directory / CONFIG)


def describe(folder: Path, files: list[str], task: str | None = None) -> dict[str, Any]:
    """The manifest's version-2 fields for a folder holding ``files`` (its cleaned config already)."""
    config = _read_json(folder / CONFIG)
    model_type, architecture, allowed = identify(config, task)
    checkpoint = read_checkpoint(folder, files)
    dtype = checkpoint.dtype
    if dtype is None or checkpoint.parameters == 0:
        raise UnsupportedModel("the checkpoint holds no floating-point weights")
    kv = _kv_bytes_per_token(config, dtype) if allowed == TEXT_GENERATION else None
    return {
        "model_type": model_type, "architecture": architecture, "task": allowed, "dtype": dtype,
        "memory": ModelMemory(checkpoint.parameters, checkpoint.nbytes, kv),
        "max_length": None if allowed == "image-classification" else _max_length(folder, files, config),
        "labels": _labels(config) if allowed.endswith("-classification") else None,
    }


def check_fetched(folder: Path, manifest: Manifest) -> None:
    """Refuse a fetched transformers model whose files say something other than its manifest.

    A source's manifest is only hashed against its files; this reads the files
    themselves, as an import would, so the memory estimate the ledger reserves
    and the allow-list check rest on the weights and config that will load.
    """
    _, dropped = clean_config(read_config(folder))
    if dropped:
        raise UnsupportedModel(f"model {manifest.id!r}: served config.json still has {', '.join(dropped)}")
    fields = describe(folder, list(manifest.files), manifest.task)
    claimed = {key: getattr(manifest, key) for key in fields}
    if claimed != fields:
        differ = sorted(key for key in fields if claimed[key] != fields[key])
        raise UnsupportedModel(f"model {manifest.id!r}: manifest disagrees with its files on {', '.join(differ)}")


def check_adapter(folder: Path) -> Checkpoint:
    """A LoRA adapter's two files, read without peft: a LORA ``adapter_config.json`` and float weights.

    Only ``hypha.train`` writes adapters into the store (an import refuses them, :func:`scan`);
    this checks what it wrote, and what a source serves, before the entry is installed.
    """
    config = _read_json(folder / "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise UnsupportedModel(f"adapter_config.json has peft_type {config.get('peft_type')!r}; only LORA is supported")
    checkpoint = read_header(folder / "adapter_model.safetensors")
    if checkpoint.dtype is None or checkpoint.parameters == 0:
        raise UnsupportedModel("adapter_model.safetensors holds no floating-point weights")
    return checkpoint


def check_fetched_adapter(folder: Path, manifest: Manifest) -> None:
    """Refuse a fetched adapter whose files say something other than its manifest (as :func:`check_fetched`)."""
    checkpoint = check_adapter(folder)
    memory = manifest.memory
    if memory is None or (memory.parameters, memory.weights_bytes) != (checkpoint.parameters, checkpoint.nbytes):
        raise UnsupportedModel(f"model {manifest.id!r}: manifest disagrees with its adapter weights on memory")


def identify(config: dict[str, Any], task: str | None = None) -> tuple[str, str, str]:
    """``(model_type, architecture, task)`` from a config, refused unless the allow-list has them."""
    model_type = config.get("model_type")
    architectures = config.get("architectures")
    if not isinstance(model_type, str) or model_type not in ALLOWED:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported; allowed: {', '.join(sorted(ALLOWED))}")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise UnsupportedModel(f"{CONFIG} names no architecture (architectures: {architectures!r})")
    architecture = architectures[0]
    allowed = task_of(model_type, architecture)
    if allowed is None:
        raise UnsupportedModel(f"architecture {architecture!r} is not supported for model_type {model_type!r}; "
                               f"allowed: {', '.join(sorted(ALLOWED[model_type]))}")
    if task is not None and task != allowed:
        raise UnsupportedModel(f"{architecture} serves task {allowed!r}, not {task!r}")
    return model_type, architecture, allowed


def _kv_bytes_per_token(config: dict[str, Any], dtype: str) -> int:
    """2 (keys and values) x layers x kv_heads x head_dim x bytes per element."""
    layers = _first_int(config, "num_hidden_layers", "n_layer")
    heads = _first_int(config, "num_attention_heads", "n_head")
    hidden = _first_int(config, "hidden_size", "n_embd")
    kv_heads = _first_int(config, "num_key_value_heads") or heads
    head_dim = _first_int(config, "head_dim") or (hidden // heads if hidden and heads else None)
    if not layers or not kv_heads or not head_dim:
        raise UnsupportedModel(f"{CONFIG} lacks the layer/head sizes needed to size the KV cache")
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def _max_length(folder: Path, files: list[str], config: dict[str, Any]) -> int | None:
    """The smallest input limit known: position embeddings, the tokenizer's, sentence-transformers'."""
    limits = [_first_int(config, "max_position_embeddings", "n_positions")]
    if "tokenizer_config.json" in files:
        limits.append(_first_int(_read_json(folder / "tokenizer_config.json"), "model_max_length"))
    if "sentence_bert_config.json" in files:
        limits.append(_first_int(_read_json(folder / "sentence_bert_config.json"), "max_seq_length"))
    known = [limit for limit in limits if limit and limit < _NO_LIMIT]
    return min(known) if known else None


def _labels(config: dict[str, Any]) -> list[str]:
    """``id2label`` as a list in id order; its ids must be exactly 0..n-1."""
    raw = config.get("id2label")
    if not isinstance(raw, dict) or not raw:
        raise UnsupportedModel(f"{CONFIG} of a classifier has no id2label")
    try:
        by_id = {int(key): value for key, value in raw.items()}
    except (TypeError, ValueError):
        raise UnsupportedModel(f"{CONFIG} id2label has a non-integer id") from None
    if sorted(by_id) != list(range(len(by_id))) or not all(isinstance(v, str) for v in by_id.values()):
        raise UnsupportedModel(f"{CONFIG} id2label must map ids 0..n-1 to names")
    return [by_id[i] for i in range(len(by_id))]


def _first_int(table: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = table.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of the folder, opened without following a link (a planted one is refused)."""
    try:
        with os.fdopen(open_regular(path.parent, path.name), "rb") as handle:
            if os.fstat(handle.fileno()).st_size > _JSON_CAP:
                raise UnsupportedModel(f"{path.name} is larger than {_JSON_CAP} bytes")
            data = json.loads(handle.read(_JSON_CAP + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UnsupportedModel(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise UnsupportedModel(f"{path.name} is not a JSON object")
    return data
