"""What a stored model or data set is: the manifest types, their file names, the id rule and the common checks.

A model is ``<id>/manifest.json`` (:class:`Manifest`) plus its files; a
training data set is ``<id>/dataset.json`` (:class:`DatasetManifest`) plus
``data.json``. Every manifest lists its files, each with a sha256 and a size.

Format ``hypha-model/1`` (unchanged, still read and still written by
``ModelStore.add("builtin", ...)``): a built-in architecture (``mlp``, ``cnn``) with
``config``, ``input_shape`` and ``weights.safetensors``.

Format ``hypha-model/2`` adds, on top of every version-1 field:

``runtime``
    ``"builtin"`` (the version-1 rules apply), ``"transformers"`` or ``"onnx"``
    (one ``model.onnx`` run by onnxruntime: see below).
``task``
    for transformers: ``feature-extraction`` (embeddings), ``text-classification``,
    ``image-classification`` or ``text-generation``; it must be the task the
    allow-list (:mod:`hypha_celery.formats.huggingface`) gives the architecture.
``architecture``
    for transformers: the class name from config.json ``architectures[0]``,
    allowed for ``model_type``.
``model_type``
    config.json ``model_type`` (transformers only).
``dtype``
    the checkpoint's floating dtype (``float32``, ``float16``, ``bfloat16``, ``float64``).
``files``
    every copied Hugging Face file with its sha256 and size: ``config.json``,
    ``model.safetensors`` or ``model.safetensors.index.json`` plus its shards
    ``model-NNNNN-of-NNNNN.safetensors``, tokenizer, generation and preprocessor
    files, and for sentence-transformers models ``modules.json``,
    ``sentence_bert_config.json``, ``config_sentence_transformers.json`` and
    ``1_Pooling/config.json`` (the only path with a folder: see :data:`HF_FILES`).
``memory``
    ``{"parameters", "weights_bytes", "kv_bytes_per_token"}`` read from the
    safetensors headers: elements in the checkpoint, their bytes at the
    checkpoint dtype, and for text generation 2 x layers x kv_heads x head_dim
    x dtype bytes (else null). :meth:`Manifest.weights_bytes_at` and
    :meth:`Manifest.kv_bytes_per_token_at` give them at a compute dtype
    (:func:`compute_dtype`: fp32 on CPU, bf16 on CUDA).
``max_length``
    the most tokens an input may have: the smallest of config.json's position
    embeddings, the tokenizer's ``model_max_length`` and sentence-transformers'
    ``max_seq_length`` that are known; null for image models.
``labels``
    for classifiers, ``id2label`` as a list in id order; null otherwise.
``dropped_config_keys``
    keys the import removed from the stored config.json (``auto_map``: it names
    code in the uploader's repository).
``adapter_of`` (only on a LoRA adapter entry, absent otherwise)
    ``{"id", "sha256"}``: the base model by id and by the sha256 of its
    ``manifest.json`` (``ModelStore.manifest_sha256``). An adapter entry holds
    exactly :data:`ADAPTER_FILES` (peft's ``adapter_config.json`` and
    ``adapter_model.safetensors``); ``model_type``, ``architecture``, ``task``,
    ``max_length``, ``labels`` and ``kv_bytes_per_token`` are its base's,
    ``parameters``/``weights_bytes`` its own. Only ``hypha.train``
    (``method: lora``) writes one: an import still refuses adapter files.

A ``runtime: onnx`` manifest (:mod:`hypha_celery.formats.onnx` reads the graph at import) has
``architecture`` ``"onnx"``, ``task`` ``"inference"``, ``files`` exactly
``model.onnx``, ``dtype`` the graph input's dtype, ``input_shape`` its
per-sample shape, ``batchable`` whether axis 0 of the input is dynamic,
``config`` ``{"inputs": [{"name", "dtype", "shape"}], "outputs": [...],
"batch_axis": 0 or null, "opsets", "ir_version"}`` (a null in a shape is a
symbolic dimension) and ``memory`` the graph's tensor bytes
(``kv_bytes_per_token`` null). It runs in its own dtypes: its weights take
``memory.weights_bytes`` on every device.

These types are the contract between the store (:mod:`hypha_celery.models.store`), the sources that
fetch into it, the formats that import and check models (:mod:`hypha_celery.formats`), validation in
the worker, the executor's runtimes, and the config (which names models by id: :func:`is_model_id` is
the one definition of an id). This module imports nothing of ours but the error tree and sizes, so every
one of those imports it from below; it imports neither torch nor transformers, so the worker's own
process can validate a manifest. A manifest may come from a remote source: it is checked field by field
before anything trusts it, the fields every manifest has here (:func:`read_runtime`, :func:`read_common`,
:func:`read_files`), each runtime's own by its format (:func:`hypha_celery.formats.registry.read_manifest`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

from hypha_celery.errors import UnsupportedModel
from hypha_celery.units import format_size

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "ADAPTER_WEIGHTS",
    "CONFIG",
    "DATA",
    "DATASET_FORMAT",
    "DATASET_MANIFEST",
    "DTYPE_BYTES",
    "FORMAT",
    "FORMAT_V2",
    "HF_FILES",
    "MODEL_MANIFEST",
    "ONNX_ARCHITECTURE",
    "ONNX_FILE",
    "ONNX_TASK",
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "WEIGHTS",
    "AdapterOf",
    "Bad",
    "DatasetManifest",
    "FileEntry",
    "Manifest",
    "ModelMemory",
    "compute_dtype",
    "expected_size",
    "is_hf_file",
    "is_model_id",
    "is_positive_int",
    "is_sha256",
    "is_weights_shard",
    "manifest_error",
    "read_common",
    "read_files",
    "read_runtime",
    "validate_model_id",
]

FORMAT = "hypha-model/1"
FORMAT_V2 = "hypha-model/2"
ONNX_FILE = "model.onnx"
ONNX_ARCHITECTURE = "onnx"
ONNX_TASK = "inference"
MODEL_MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
DATASET_FORMAT = "hypha-dataset/1"
DATASET_MANIFEST = "dataset.json"
DATA = "data.json"
CONFIG = "config.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS})  # an adapter entry's files: these two, nothing else
# Hugging Face files a transformers model may carry into the store. Exact names (one path
# component, except sentence-transformers' pooling config), plus the shard pattern below.
HF_FILES = frozenset({
    CONFIG, SAFETENSORS_SINGLE, SAFETENSORS_INDEX,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json", "preprocessor_config.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json",
})
_SHARD = re.compile(r"^model-[0-9]{5}-of-[0-9]{5}\.safetensors\Z")
# Bytes per element of the floating dtypes a checkpoint or a computation may use.
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# \Z, not $: "$" also matches before a trailing newline, and "mlp\n" is not a valid id.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_V2_KEYS = ("runtime", "model_type", "memory", "max_length", "labels", "dropped_config_keys", "adapter_of")


def is_model_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is one safe path component: a model or data set id."""
    return isinstance(value, str) and bool(_MODEL_ID.match(value)) and ".." not in value


def validate_model_id(model_id: object) -> str:
    """Return ``model_id`` if it is a well-formed id, else raise ``UnsupportedModel``."""
    if not is_model_id(model_id):
        raise UnsupportedModel(
            f"invalid model id {model_id!r}: use letters, digits, '_', '-', '.' "
            "(one name, at most 128 characters, no '..' or '/')"
        )
    return model_id


def is_weights_shard(name: object) -> bool:
    """Whether ``name`` is a sharded checkpoint's file (``model-00001-of-00002.safetensors``)."""
    return isinstance(name, str) and bool(_SHARD.match(name))


def is_hf_file(name: object) -> bool:
    """Whether ``name`` (a path relative to the model folder) is a file a transformers model may carry."""
    return isinstance(name, str) and (name in HF_FILES or is_weights_shard(name))


def expected_size(manifest: Manifest, device: str) -> int:
    """The bytes a model takes in a serving executor's cache on ``device``: a transformers model's at its compute dtype."""
    if manifest.runtime in ("transformers", "onnx"):
        return manifest.weights_bytes_at(compute_dtype(device))
    return manifest.size


def compute_dtype(device: str) -> str:
    """The dtype a transformers model computes in on ``device``: bf16 on CUDA, fp32 elsewhere."""
    return "bfloat16" if device.startswith("cuda") else "float32"


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelMemory:
    """A transformers model's size, read from its safetensors headers before anything loads it.

    ``parameters`` counts every element stored in the checkpoint (buffers saved
    beside the weights included); ``weights_bytes`` is their bytes as stored.
    """

    parameters: int
    weights_bytes: int
    kv_bytes_per_token: int | None = None


@dataclass(frozen=True)
class AdapterOf:
    """The base model a LoRA adapter was trained on: its id and its manifest's sha256."""

    id: str
    sha256: str


class _Listed:
    """What every manifest has: the files it lists, each with a sha256 and a size."""

    files: dict[str, FileEntry]

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]
        data["files"] = {name: asdict(entry) for name, entry in self.files.items()}
        return data


@dataclass(frozen=True)
class Manifest(_Listed):
    """What a stored model is. ``input_shape`` is per sample (no batch dimension; empty for transformers)."""

    id: str
    architecture: str
    config: dict[str, Any]
    input_shape: list[int]
    files: dict[str, FileEntry]
    dtype: str = "float32"
    task: str = "classification"
    batchable: bool = True
    parent: str | None = None
    created_at: float = field(default_factory=time.time)
    format: str = FORMAT
    runtime: str = "builtin"
    model_type: str | None = None
    memory: ModelMemory | None = None
    max_length: int | None = None
    labels: list[str] | None = None
    dropped_config_keys: list[str] = field(default_factory=list)
    adapter_of: AdapterOf | None = None

    @property
    def weights_files(self) -> list[str]:
        """The files holding weights: ``weights.safetensors``, ``model.safetensors``, shards, an adapter's, ``model.onnx``."""
        return sorted(name for name in self.files
                      if name in (WEIGHTS, SAFETENSORS_SINGLE, ADAPTER_WEIGHTS, ONNX_FILE) or is_weights_shard(name))

    def weights_bytes_at(self, dtype: str) -> int:
        """Bytes of the weights once materialised in ``dtype`` (``compute_dtype(device)``); an ONNX graph keeps its own."""
        if self.memory is None:
            return self.size
        if self.runtime == "onnx":
            return self.memory.weights_bytes
        return self.memory.parameters * DTYPE_BYTES[dtype]

    def kv_bytes_per_token_at(self, dtype: str) -> int | None:
        """KV-cache bytes per token in ``dtype``; None for models that do not generate."""
        if self.memory is None or self.memory.kv_bytes_per_token is None:
            return None
        return self.memory.kv_bytes_per_token * DTYPE_BYTES[dtype] // DTYPE_BYTES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if self.format == FORMAT:  # version 1 stays byte-for-byte what older workers wrote and read
            for key in _V2_KEYS:
                data.pop(key)
        elif self.adapter_of is None:  # only adapters carry it: a model's manifest bytes stay what they were
            data.pop("adapter_of")
        return data


Bad = Callable[[str], UnsupportedModel]  # makes a manifest's error, naming the model


def manifest_error(model_id: str) -> Bad:
    """The error-maker for ``model_id``'s manifest: every refusal names the model and says what is wrong."""
    def bad(reason: str) -> UnsupportedModel:
        return UnsupportedModel(f"model {model_id!r}: manifest {reason}")
    return bad


def read_runtime(data: Any, model_id: str) -> str:
    """What every model manifest starts with, checked (a JSON object of a known format, for this id): its runtime.

    Version 1 is always ``builtin``; whether the runtime is known is the format registry's question
    (:func:`hypha_celery.formats.registry.read_manifest`, which reads a whole manifest).
    """
    bad = manifest_error(model_id)
    if not isinstance(data, dict):
        raise bad("is not a JSON object")
    if data.get("format") not in (FORMAT, FORMAT_V2):
        raise bad(f"has format {data.get('format')!r}, expected {FORMAT!r} or {FORMAT_V2!r}")
    if data.get("id") != model_id:
        raise bad(f"is for {data.get('id')!r}, not {model_id!r}")
    runtime = data.get("runtime", "builtin") if data["format"] == FORMAT_V2 else "builtin"
    if not isinstance(runtime, str):
        raise bad(f"has unknown runtime {runtime!r}")
    return runtime


def read_common(data: dict[str, Any], model_id: str, *, shapeless: bool = False) -> dict[str, Any]:
    """The fields every runtime's manifest has, checked, as :class:`Manifest` keyword arguments.

    ``shapeless``: the format's models take no per-sample shape (a missing ``input_shape`` is ``[]``).
    """
    bad = manifest_error(model_id)
    shape = data.get("input_shape", [] if shapeless else None)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise bad(f"has an invalid input_shape {shape!r}")
    if not isinstance(data.get("config") or {}, dict):
        raise bad(f"has a config that is not a table: {data.get('config')!r}")
    created_at = data.get("created_at") or 0.0
    if isinstance(created_at, bool) or not isinstance(created_at, (int, float)):
        raise bad(f"has an invalid created_at {created_at!r}")
    if not isinstance(data.get("parent"), (str, type(None))):
        raise bad(f"has an invalid parent {data.get('parent')!r}")
    if not isinstance(data.get("batchable", True), bool):
        raise bad(f"has a non-boolean batchable {data.get('batchable')!r}")
    if data.get("dtype", "float32") not in DTYPE_BYTES:
        raise bad(f"has unsupported dtype {data.get('dtype')!r}")
    return {
        "id": model_id, "config": dict(data.get("config") or {}), "input_shape": list(shape),
        "dtype": data.get("dtype", "float32"), "batchable": data.get("batchable", True),
        "parent": data.get("parent"), "created_at": float(created_at), "format": data["format"],
    }


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a sha256 as manifests write it: 64 lowercase hex digits."""
    return isinstance(value, str) and bool(_SHA256.match(value))


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class DatasetManifest(_Listed):
    """A stored training data set: ``data.json`` holds ``{"inputs": [...], "targets": [...]}``."""

    id: str
    rows: int
    files: dict[str, FileEntry]
    created_at: float = field(default_factory=time.time)
    format: str = DATASET_FORMAT

    @classmethod
    def from_json(cls, data: Any, dataset_id: str, max_size: int | None = None) -> DatasetManifest:
        def bad(reason: str) -> UnsupportedModel:
            return UnsupportedModel(f"data set {dataset_id!r}: manifest {reason}")

        if not isinstance(data, dict):
            raise bad("is not a JSON object")
        if data.get("format") != DATASET_FORMAT:
            raise bad(f"has format {data.get('format')!r}, expected {DATASET_FORMAT!r}")
        if data.get("id") != dataset_id:
            raise bad(f"is for {data.get('id')!r}, not {dataset_id!r}")
        rows = data.get("rows")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
            raise bad(f"has an invalid row count {rows!r}")
        created = data.get("created_at") or 0.0
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            raise bad(f"has an invalid created_at {created!r}")
        files = read_files(data.get("files"), bad, max_size)
        if DATA not in files:
            raise bad(f"does not list {DATA}")
        return cls(id=dataset_id, rows=rows, files=files, created_at=float(created))


def _one_component(name: str) -> bool:
    return bool(_FILE_NAME.match(name)) and ".." not in name


def read_files(
    raw: Any, bad: Bad, max_size: int | None,
    allowed: Callable[[str], bool] = _one_component,
) -> dict[str, FileEntry]:
    """A manifest's ``files``: allowed names, a sha256 and a positive size each, under the cap."""
    if not isinstance(raw, dict):
        raise bad("has no table of files")
    files = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not allowed(name):
            raise bad(f"lists an invalid file name {name!r}")
        if not isinstance(entry, dict) or not is_sha256(entry.get("sha256")):
            raise bad(f"has no valid sha256 for {name}")
        size = entry.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise bad(f"has no valid size for {name}")
        if max_size is not None and size > max_size:
            raise bad(f"lists {name} at {format_size(size)}, above max_model_size ({format_size(max_size)})")
        files[name] = FileEntry(sha256=entry["sha256"], size=size)
    return files
