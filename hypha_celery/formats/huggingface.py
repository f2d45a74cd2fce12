"""The Hugging Face format: which transformers models the worker accepts, their import and their checks.

No torch or transformers here: a worker's own process imports, sizes and checks a model with it.

**The allow-list.** ``ALLOWED[model_type][architecture]`` is the one task that class serves. Each
architecture is the class the installed transformers maps that ``model_type`` to for that task
(``MODEL_MAPPING_NAMES`` for feature extraction, ``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES``,
``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``, ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``);
``tests/unit/test_huggingface.py`` checks that against the installed package. Only types whose
modelling code ships inside transformers are here: nothing on this list needs ``trust_remote_code``.
Why these: BERT, DistilBERT, RoBERTa, XLM-RoBERTa and MPNet are what embedding models
(sentence-transformers) and text classifiers are published as; Llama, Mistral, Qwen2 and GPT-2 cover
most open causal LMs and their fine-tunes; ViT is the reference image classifier.

**The folder.** :func:`scan` walks a model directory and sorts every file: refused (the whole
import is refused: loading could run code that came with the model), copied (on the allow-list,
:data:`~hypha_celery.manifest.HF_FILES`) or skipped (harmless and unused: README.md, vocab.txt,
.gitattributes, ...). :func:`describe` reads the copied files (config, safetensors headers,
tokenizer settings) into the manifest's version-2 fields. :func:`clean_config` refuses config keys
that make transformers load something else and drops ``auto_map``.

**The import.** :func:`store` copies the allow-listed files into the store (``runtime:
transformers``); with ``base=`` it stores a LoRA adapter that ``hypha.train`` wrote instead
(:func:`check_adapter`). :func:`check_fetched` reads a fetched model's files as an import would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.base import Format, Imported, StoredModel, Target
from hypha_celery.formats.safe_files import copy_capped, open_regular, sha256_file, walk
from hypha_celery.formats.safetensors import Checkpoint, read_checkpoint, read_header
from hypha_celery.manifest import (
    ADAPTER_FILES,
    CONFIG,
    DTYPE_BYTES,
    FORMAT_V2,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    AdapterOf,
    Bad,
    FileEntry,
    Manifest,
    ModelMemory,
    is_hf_file,
    is_model_id,
    is_positive_int,
    is_sha256,
    is_weights_shard,
    read_files,
)
from hypha_celery.units import format_size

__all__ = ["ALLOWED", "FORMAT", "LORA_TARGET_MODULES", "TASKS", "Scan", "check_adapter", "check_fetched",
           "clean_config", "describe", "identify", "read_config", "scan", "store", "task_of"]

FEATURE_EXTRACTION = "feature-extraction"
TEXT_CLASSIFICATION = "text-classification"
IMAGE_CLASSIFICATION = "image-classification"
TEXT_GENERATION = "text-generation"
TASKS = (FEATURE_EXTRACTION, TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, TEXT_GENERATION)

ALLOWED: dict[str, dict[str, str]] = {
    "bert": {"BertModel": FEATURE_EXTRACTION, "BertForSequenceClassification": TEXT_CLASSIFICATION},
    "distilbert": {"DistilBertModel": FEATURE_EXTRACTION, "DistilBertForSequenceClassification": TEXT_CLASSIFICATION},
    "roberta": {"RobertaModel": FEATURE_EXTRACTION, "RobertaForSequenceClassification": TEXT_CLASSIFICATION},
    "xlm-roberta": {"XLMRobertaModel": FEATURE_EXTRACTION,
                    "XLMRobertaForSequenceClassification": TEXT_CLASSIFICATION},
    "mpnet": {"MPNetModel": FEATURE_EXTRACTION, "MPNetForSequenceClassification": TEXT_CLASSIFICATION},
    "llama": {"LlamaForCausalLM": TEXT_GENERATION},
    "mistral": {"MistralForCausalLM": TEXT_GENERATION},
    "qwen2": {"Qwen2ForCausalLM": TEXT_GENERATION},
    "gpt2": {"GPT2LMHeadModel": TEXT_GENERATION},
    "vit": {"ViTForImageClassification": IMAGE_CLASSIFICATION},
}

# LoRA's default target modules per model_type (``hypha.train`` ``method: lora`` without
# ``target_modules``): the attention query and value projections, as peft's own defaults.
LORA_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"], "mpnet": ["q", "v"],
}


def task_of(model_type: object, architecture: object) -> str | None:
    """The task ``architecture`` serves for ``model_type``, or None when the pair is not allowed."""
    if not isinstance(model_type, str) or not isinstance(architecture, str):
        return None
    return ALLOWED.get(model_type, {}).get(architecture)


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
_ADAPTER = tuple(sorted(ADAPTER_FILES))
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
    An adapter entry is checked as one (:func:`check_fetched_adapter`).
    """
    if manifest.adapter_of is not None:
        check_fetched_adapter(folder, manifest)
        return
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


def store(target: Target, source: str | os.PathLike[str], model_id: str, *, task: str | None = None,
          base: str | StoredModel | None = None, parent: str | None = None,
          produced_by: dict[str, Any] | None = None) -> Imported:
    """Store a local Hugging Face model directory as ``model_id`` (format 2, runtime ``transformers``).

    Refused files (pickle, code, adapters) refuse the whole import before
    anything is copied; allow-listed files are copied into a staging folder,
    the stored ``config.json`` is rewritten without ``auto_map`` (copied as is when it has none), and the
    manifest is computed from the copies (so what was measured is what is
    stored) before one rename installs the model. ``parent`` and ``produced_by``: the model it was
    trained from, and the saving task's record (``hypha.train`` stores a fine-tuned model through here).
    With ``base`` (an id, or the base's verified entry a training run holds already), ``source`` holds a
    LoRA adapter trained on that stored model instead (:func:`_store_adapter`).
    """
    if base is not None:
        return _store_adapter(target, Path(source), model_id, base, produced_by)
    folder = Path(source)
    cap = target.max_model_size
    found = scan(folder)  # links and other non-regular files refuse the import
    if found.size > cap:
        raise UnsupportedModel(f"{folder}: its files hold {found.size} bytes, above max_model_size "
                               f"({cap} bytes); nothing was copied")
    config, dropped = clean_config(read_config(folder))
    identify(config, task)  # refuse an unsupported model before copying gigabytes
    read_checkpoint(folder, found.copy)  # every tensor's size, checked against its file's, before a byte is copied
    with target.transaction(model_id) as new:
        staging = new.folder
        files: dict[str, FileEntry] = {}
        left = cap  # again while copying: a file may grow after it was measured
        for name in found.copy:
            staged = staging / name
            staged.parent.mkdir(parents=True, exist_ok=True)
            if name == CONFIG and dropped:
                staged.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                entry = FileEntry(sha256=sha256_file(staged), size=staged.stat().st_size)
            else:
                copied = copy_capped(open_regular(folder, name), staged, left, f"{folder}/{name}")
                entry = FileEntry(sha256=copied.sha256, size=copied.size)
            files[name] = entry
            left -= entry.size
            if left < 0:
                raise UnsupportedModel(f"{folder}: larger than max_model_size ({format_size(cap)})")
        if clean_config(read_config(staging))[1]:  # the source changed since it was read
            raise UnsupportedModel(f"{folder}: config.json changed during the import; run it again")
        manifest = Manifest(
            id=model_id, config={}, input_shape=[], files=files, format=FORMAT_V2, runtime="transformers",
            dropped_config_keys=dropped, parent=parent, **describe(staging, found.copy, task),
        )
        new.install(manifest, produced_by)
    return Imported(manifest, found.skipped)


def _store_adapter(target: Target, folder: Path, model_id: str, base: str | StoredModel,
                   produced_by: dict[str, Any] | None) -> Imported:
    """Store peft's ``adapter_config.json`` + ``adapter_model.safetensors`` in ``folder`` as an adapter entry.

    Its manifest names the base by id and by the sha256 of the base's manifest; every
    other model field is the base's (:mod:`hypha_celery.manifest`, ``adapter_of``). Only those two
    files are copied: anything else peft wrote (a model card) stays behind.
    """
    stored = target.open(base) if isinstance(base, str) else base
    base_manifest, base_sha256 = stored.manifest, stored.sha256
    if base_manifest.runtime != "transformers" or base_manifest.adapter_of is not None or base_manifest.memory is None:
        raise UnsupportedModel(f"model {base_manifest.id!r} is not a transformers model: it takes no adapter")
    with target.transaction(model_id) as new:
        staging = new.folder
        files: dict[str, FileEntry] = {}
        left = target.max_model_size
        for name in sorted(ADAPTER_FILES):
            try:
                copied = copy_capped(open_regular(folder, name), staging / name, left, f"{folder}/{name}")
            except FileNotFoundError:
                raise UnsupportedModel(f"{folder}: holds no {name}") from None
            files[name] = FileEntry(sha256=copied.sha256, size=copied.size)
            left -= copied.size
        checkpoint = check_adapter(staging)
        manifest = dataclasses.replace(
            base_manifest, id=model_id, files=files, dtype=checkpoint.dtype or base_manifest.dtype,
            memory=ModelMemory(checkpoint.parameters, checkpoint.nbytes, base_manifest.memory.kv_bytes_per_token),
            parent=base_manifest.id, created_at=time.time(), dropped_config_keys=[],
            adapter_of=AdapterOf(id=base_manifest.id, sha256=base_sha256),
        )
        new.install(manifest, produced_by)
    return Imported(manifest, [])


def _manifest_fields(data: dict[str, Any], common: dict[str, Any], bad: Bad, max_size: int | None) -> dict[str, Any]:
    """The fields only a ``runtime: transformers`` manifest has, checked against the allow-list."""
    model_type, architecture, task = data.get("model_type"), data.get("architecture"), data.get("task")
    allowed = task_of(model_type, architecture)
    if allowed is None:
        raise bad(f"names model_type {model_type!r} / architecture {architecture!r}, not on the allow-list")
    if task != allowed:
        raise bad(f"has task {task!r}; {architecture} serves {allowed!r}")
    adapter_of = _adapter_of(data.get("adapter_of"), bad)
    if adapter_of is not None:
        files = read_files(data.get("files"), bad, max_size, ADAPTER_FILES.__contains__)
        if set(files) != ADAPTER_FILES:
            raise bad(f"of an adapter must list exactly {', '.join(sorted(ADAPTER_FILES))}")
    else:
        files = read_files(data.get("files"), bad, max_size, is_hf_file)
        if CONFIG not in files:
            raise bad(f"does not list {CONFIG}")
        shards = [name for name in files if is_weights_shard(name)]
        if not (SAFETENSORS_SINGLE in files or (SAFETENSORS_INDEX in files and shards)):
            raise bad(f"lists no weights ({SAFETENSORS_SINGLE}, or {SAFETENSORS_INDEX} with its shards)")
    memory = data.get("memory")
    if not isinstance(memory, dict):
        raise bad("has no memory estimate")
    parameters, weights_bytes, kv = memory.get("parameters"), memory.get("weights_bytes"), memory.get("kv_bytes_per_token")
    if not isinstance(parameters, int) or not isinstance(weights_bytes, int) or not (
            is_positive_int(parameters) and is_positive_int(weights_bytes)):
        raise bad(f"has an invalid memory estimate {memory!r}")
    if (task == TEXT_GENERATION) != is_positive_int(kv) or (kv is not None and not is_positive_int(kv)):
        raise bad(f"has an invalid kv_bytes_per_token {kv!r} for task {task!r}")
    max_length = data.get("max_length")
    if max_length is not None and not is_positive_int(max_length):
        raise bad(f"has an invalid max_length {max_length!r}")
    labels = data.get("labels")
    if task.endswith("-classification"):
        if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
            raise bad(f"has invalid labels {labels!r} for a classifier")
    elif labels is not None:
        raise bad(f"has labels, but task {task!r} does not classify")
    dropped = data.get("dropped_config_keys", [])
    if not isinstance(dropped, list) or not all(isinstance(key, str) for key in dropped):
        raise bad(f"has invalid dropped_config_keys {dropped!r}")
    return {
        "architecture": architecture, "files": files, "task": task, "runtime": "transformers",
        "model_type": model_type, "memory": ModelMemory(parameters, weights_bytes, kv),
        "max_length": max_length, "labels": None if labels is None else list(labels), "dropped_config_keys": list(dropped),
        "adapter_of": adapter_of,
    }


def _adapter_of(raw: Any, bad: Bad) -> AdapterOf | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not is_model_id(raw.get("id")) or not is_sha256(raw.get("sha256")):
        raise bad(f"has an invalid adapter_of {raw!r} (expected {{'id': <model id>, 'sha256': <64 hex digits>}})")
    return AdapterOf(id=raw["id"], sha256=raw["sha256"])


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


FORMAT = Format(runtime="transformers", manifest_fields=_manifest_fields, check_fetched=check_fetched, store=store,
                shapeless=True)
