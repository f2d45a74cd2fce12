"""The ONNX format: one graph file, imported and checked before it enters the store or a runtime, with ``onnx`` alone.

An ONNX model is one file, ``model.onnx``: a protobuf holding the graph and its
weights. It is parsed from its bytes with ``onnx.load_model_from_string`` (what
``onnx.load(path, load_external_data=False)`` does, without a folder to resolve
anything against): nothing outside the bytes handed in is read.
:func:`describe` then refuses, before onnxruntime ever sees the graph:

* **external data**: any tensor (initializer, sparse initializer, a
  ``Constant``'s or any node's tensor attribute, in the main graph, in every
  subgraph of ``If``/``Loop``/``Scan`` and in the model's local functions) whose
  ``data_location`` is ``EXTERNAL`` or that carries ``external_data`` entries.
  onnxruntime resolves such a tensor's ``location`` against the model's folder,
  and a location like ``../../etc/passwd`` or an absolute path reads a file of
  the uploader's choosing (onnx#3991, CVE-2024-27318); the store keeps a model to
  its one file;
* **custom operators**: a node in a domain other than the standard ones
  (:data:`ALLOWED_DOMAINS`, all built into onnxruntime) or a function the model
  defines itself; any other domain needs a shared library registered with
  onnxruntime, which the worker never loads;
* graphs the runtime cannot feed: not exactly one tensor input, an input
  dtype other than float16/float32/float64, a per-sample dimension that is not
  a fixed positive number, an output that is not a numeric tensor.

It reads the input and output names, dtypes and shapes, and the **batch axis**:
axis 0 of the input when it is symbolic (``dim_param``, or no value), so
items from concurrent requests run as one batch (``batchable: true``). A graph
whose input is all fixed numbers runs one sample at a time (``batchable:
false``): with a leading 1 it is treated as a batch axis of size 1, otherwise
the whole input shape is one sample. The memory estimate is the graph's
tensors' bytes (initializers and constant attributes), counted from their
dims and dtype.

:func:`store` imports a ``.onnx`` file (or a folder holding ``model.onnx``):
the copy is what :func:`describe` checks and measures, so the stored graph is
the one checked. Imports neither torch nor onnxruntime (the worker's own
process can run it); importing ``onnx`` costs well under a second.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.base import Format, Imported, Target
from hypha_celery.formats.safe_files import copy_capped, open_regular, walk
from hypha_celery.manifest import (
    FORMAT_V2,
    ONNX_ARCHITECTURE,
    ONNX_FILE,
    ONNX_TASK,
    Bad,
    FileEntry,
    Manifest,
    ModelMemory,
    read_files,
)
from hypha_celery.units import format_size

__all__ = ["ALLOWED_DOMAINS", "FORMAT", "Described", "check_fetched", "describe", "describe_bytes", "store"]

# Operator domains built into onnxruntime: the ONNX standard, ONNX-ML, and onnxruntime's own contrib ops.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
# ONNX TensorProto element types -> (name, bytes per element).
_ELEMENT_TYPES = {
    1: ("float32", 4), 2: ("uint8", 1), 3: ("int8", 1), 4: ("uint16", 2), 5: ("int16", 2), 6: ("int32", 4),
    7: ("int64", 8), 9: ("bool", 1), 10: ("float16", 2), 11: ("float64", 8), 12: ("uint32", 4),
    13: ("uint64", 8), 16: ("bfloat16", 2),
}
_INPUT_DTYPES = ("float32", "float16", "float64")
_EXTERNAL = 1  # TensorProto.EXTERNAL
_WHY_EXTERNAL = ("uses external data (a tensor stored in another file); onnxruntime would read the path the model "
                 "names, which may point anywhere (onnx#3991, CVE-2024-27318): save the model as one file "
                 "(onnx.save_model(..., save_as_external_data=False), below 2 GB)")


@dataclass(frozen=True)
class Described:
    """What a graph is, in the manifest's terms (:meth:`fields`)."""

    config: dict[str, Any]
    input_shape: list[int]
    dtype: str
    batchable: bool
    memory: ModelMemory

    def fields(self) -> dict[str, Any]:
        return {"config": self.config, "input_shape": self.input_shape, "dtype": self.dtype,
                "batchable": self.batchable, "memory": self.memory}


def describe(path: Path, max_size: int | None = None) -> Described:
    """Read and check the ONNX file at ``path`` (see the module docstring)."""
    try:
        size = path.stat().st_size
        if max_size is not None and size > max_size:
            raise UnsupportedModel(f"{path}: {format_size(size)}, above max_model_size ({format_size(max_size)})")
        data = path.read_bytes()
    except OSError as exc:
        raise UnsupportedModel(f"{path}: unreadable ({exc})") from None
    return describe_bytes(data, str(path))


def describe_bytes(data: bytes, what: str) -> Described:
    """:func:`describe` for the bytes of an ONNX file (the runtime checks the very bytes it loads)."""
    graph_model = _parse(data, what)
    _refuse_external_data(graph_model, what)
    _refuse_custom_domains(graph_model, what)
    initialised = {tensor.name for tensor in graph_model.graph.initializer}
    inputs = [value for value in graph_model.graph.input if value.name not in initialised]
    if len(inputs) != 1:
        raise UnsupportedModel(f"{what}: the graph has {len(inputs)} inputs "
                               f"({', '.join(v.name for v in inputs)}); hypha.infer feeds exactly one tensor")
    graph_input = _tensor(inputs[0], what, "input")
    if graph_input["dtype"] not in _INPUT_DTYPES:
        raise UnsupportedModel(f"{what}: input {graph_input['name']!r} is {graph_input['dtype']}; "
                               f"supported input dtypes: {', '.join(_INPUT_DTYPES)}")
    shape = graph_input["shape"]
    if shape is None or not shape:
        raise UnsupportedModel(f"{what}: input {graph_input['name']!r} has no fixed rank (shape {shape!r})")
    dynamic_batch = shape[0] is None
    if any(dim is None for dim in shape[1:]):
        raise UnsupportedModel(f"{what}: input {graph_input['name']!r} has shape {shape}: only axis 0 (the batch) "
                               "may be dynamic; every other dimension must be a fixed number")
    if dynamic_batch or shape[0] == 1:
        batch_axis: int | None = 0
        sample = [int(dim) for dim in shape[1:]]
    else:
        batch_axis, sample = None, [int(dim) for dim in shape]
    if not sample:
        raise UnsupportedModel(f"{what}: input {graph_input['name']!r} has shape {shape}: no per-sample dimension")
    outputs = [_tensor(value, what, "output") for value in graph_model.graph.output]
    if not outputs:
        raise UnsupportedModel(f"{what}: the graph has no outputs")
    for output in outputs:
        if output["dtype"] not in _ELEMENT_TYPES_BY_NAME:
            raise UnsupportedModel(f"{what}: output {output['name']!r} is {output['dtype']}, not a numeric tensor")
    parameters = weights = 0
    for tensor in _tensors(graph_model):
        if tensor.data_type not in _ELEMENT_TYPES:
            continue  # strings and exotic types: no weights worth counting, and none onnxruntime allocates by dims
        elements = math.prod(tensor.dims)
        parameters += elements
        weights += elements * _ELEMENT_TYPES[tensor.data_type][1]
    config = {
        "inputs": [graph_input],
        "outputs": outputs,
        "batch_axis": batch_axis,
        "opsets": {entry.domain or "ai.onnx": int(entry.version) for entry in graph_model.opset_import},
        "ir_version": int(graph_model.ir_version),
    }
    return Described(config=config, input_shape=sample, dtype=graph_input["dtype"],
                     batchable=dynamic_batch, memory=ModelMemory(parameters=parameters, weights_bytes=weights))


_ELEMENT_TYPES_BY_NAME = {name for name, _ in _ELEMENT_TYPES.values()}


def check_fetched(folder: Path, manifest: Manifest) -> None:
    """Refuse a fetched ONNX model whose graph says something other than its manifest (or breaks the rules above)."""
    fields = describe(folder / ONNX_FILE).fields()
    claimed = {key: getattr(manifest, key) for key in fields}
    if claimed != fields:
        differ = sorted(key for key in fields if claimed[key] != fields[key])
        raise UnsupportedModel(f"model {manifest.id!r}: manifest disagrees with its graph on {', '.join(differ)}")


def store(target: Target, source: str | os.PathLike[str], model_id: str, *, parent: str | None = None,
          produced_by: dict[str, Any] | None = None) -> Imported:
    """Store an ONNX model as ``model_id`` (format 2, runtime ``onnx``).

    ``source`` is a ``.onnx`` file, or a directory holding ``model.onnx`` (its
    other files are skipped: external data is refused, so nothing else is
    needed). The file is copied into a staging folder first and the copy is
    what :func:`describe` checks and measures, so the stored graph is the one
    checked; one rename installs it.
    """
    path = Path(source)
    skipped: list[str] = []
    if path.is_dir():
        inside = walk(path).files  # links and other non-regular files refuse the import
        skipped = sorted(name for name in inside if name != ONNX_FILE)
        if ONNX_FILE not in inside:
            raise UnsupportedModel(f"{source}: holds no {ONNX_FILE}")
        folder, name, size = path, ONNX_FILE, inside[ONNX_FILE]
    elif path.suffix != ".onnx" or not path.is_file():
        raise UnsupportedModel(f"{source}: not a .onnx file or a directory holding {ONNX_FILE}")
    else:  # the file the operator named, wherever a link they made leads
        path = path.resolve()
        folder, name, size = path.parent, path.name, path.stat().st_size
    cap = target.max_model_size
    if size > cap:
        raise UnsupportedModel(f"{path}: larger than max_model_size ({format_size(cap)})")
    with target.transaction(model_id) as new:
        staged = new.folder / ONNX_FILE
        copied = copy_capped(open_regular(folder, name), staged, cap, str(path))
        described = describe(staged, cap)
        manifest = Manifest(
            id=model_id, architecture=ONNX_ARCHITECTURE, task=ONNX_TASK,
            files={ONNX_FILE: FileEntry(sha256=copied.sha256, size=copied.size)},
            format=FORMAT_V2, runtime="onnx", parent=parent, **described.fields(),
        )
        new.install(manifest, produced_by)
    return Imported(manifest, skipped)


def _manifest_fields(data: dict[str, Any], common: dict[str, Any], bad: Bad, max_size: int | None) -> dict[str, Any]:
    """The fields of a ``runtime: onnx`` manifest: one graph file, its input and outputs, its batch axis."""
    if data.get("architecture") != ONNX_ARCHITECTURE or data.get("task") != ONNX_TASK:
        raise bad(f"has architecture {data.get('architecture')!r} / task {data.get('task')!r}; an ONNX model has "
                  f"{ONNX_ARCHITECTURE!r} / {ONNX_TASK!r}")
    files = read_files(data.get("files"), bad, max_size)
    if set(files) != {ONNX_FILE}:
        raise bad(f"lists {sorted(files)}; an ONNX model is exactly {ONNX_FILE} (external data is refused)")
    if common["dtype"] not in _INPUT_DTYPES:
        raise bad(f"has input dtype {common['dtype']!r}; ONNX inputs are float16, float32 or float64")
    config = common["config"]
    inputs, outputs, axis = config.get("inputs"), config.get("outputs"), config.get("batch_axis", "missing")
    if not isinstance(inputs, list) or len(inputs) != 1 or not _named_tensors(inputs):
        raise bad(f"has invalid config.inputs {inputs!r}: one input with a name")
    if not isinstance(outputs, list) or not outputs or not _named_tensors(outputs):
        raise bad(f"has invalid config.outputs {outputs!r}: one or more outputs with names")
    if axis not in (0, None) or isinstance(axis, bool) or (common["batchable"] and axis != 0):
        raise bad(f"has an invalid batch_axis {axis!r} (batchable: {common['batchable']})")
    memory = data.get("memory")
    if not isinstance(memory, dict):
        raise bad("has no memory estimate")
    parameters, weights_bytes = memory.get("parameters"), memory.get("weights_bytes")
    if not isinstance(parameters, int) or not isinstance(weights_bytes, int) or isinstance(parameters, bool) \
            or isinstance(weights_bytes, bool) or min(parameters, weights_bytes) < 0 \
            or memory.get("kv_bytes_per_token") is not None:
        raise bad(f"has an invalid memory estimate {memory!r}")
    for key in ("model_type", "max_length", "labels"):
        if data.get(key) is not None:
            raise bad(f"has {key} {data.get(key)!r}; an ONNX model has none")
    return {"architecture": ONNX_ARCHITECTURE, "files": files, "task": ONNX_TASK, "runtime": "onnx",
            "memory": ModelMemory(parameters, weights_bytes, None)}


def _named_tensors(entries: list[Any]) -> bool:
    return all(isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"] for entry in entries)


def _parse(data: bytes, what: str) -> Any:
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise UnsupportedModel(f"{what}: an ONNX model needs the [onnx] extra (onnx, onnxruntime)") from None

    try:
        # From bytes, with no folder: onnx never resolves external data here (it is load_external_data=False's
        # behaviour for a path, and the load below refuses any tensor that would need it).
        return onnx.load_model_from_string(data, format="protobuf")
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise UnsupportedModel(f"{what}: not a readable ONNX model ({type(exc).__name__}: {exc})"[:500]) from None


def _graphs(graph_model: Any) -> Iterator[Any]:
    """The main graph and every subgraph (attributes ``g`` and ``graphs``), the model's functions' included."""
    pending = [graph_model.graph]
    for function in graph_model.functions:
        pending.extend(_subgraphs(function.node))
    while pending:
        graph = pending.pop()
        yield graph
        pending.extend(_subgraphs(graph.node))


def _subgraphs(nodes: Any) -> Iterator[Any]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield attribute.g
            yield from attribute.graphs


def _nodes(graph_model: Any) -> Iterator[Any]:
    for graph in _graphs(graph_model):
        yield from graph.node
    for function in graph_model.functions:
        yield from function.node


def _tensors(graph_model: Any) -> Iterator[Any]:
    """Every TensorProto the model holds: initializers, sparse ones' values and indices, node attributes."""
    for graph in _graphs(graph_model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in _nodes(graph_model):
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            sparse_tensors = list(attribute.sparse_tensors)
            if attribute.HasField("sparse_tensor"):
                sparse_tensors.append(attribute.sparse_tensor)
            for sparse in sparse_tensors:
                yield sparse.values
                yield sparse.indices


def _refuse_external_data(graph_model: Any, what: str) -> None:
    for tensor in _tensors(graph_model):
        if tensor.data_location == _EXTERNAL or len(tensor.external_data) > 0:
            locations = [entry.value for entry in tensor.external_data if entry.key == "location"]
            where = f" (location {locations[0]!r})" if locations else ""
            raise UnsupportedModel(f"{what}: tensor {tensor.name!r}{where} {_WHY_EXTERNAL}")


def _refuse_custom_domains(graph_model: Any, what: str) -> None:
    local = {(function.domain, function.name) for function in graph_model.functions}
    custom = sorted({node.domain for node in _nodes(graph_model)
                     if node.domain not in ALLOWED_DOMAINS and (node.domain, node.op_type) not in local})
    if custom:
        raise UnsupportedModel(f"{what}: uses operators from custom domain(s) {', '.join(map(repr, custom))}; "
                               "they need a shared library registered with onnxruntime, which the worker never loads "
                               f"(allowed domains: {', '.join(repr(d) for d in sorted(ALLOWED_DOMAINS))})")


def _tensor(value: Any, what: str, role: str) -> dict[str, Any]:
    """A graph input's or output's name, dtype and shape (``None`` for a symbolic or unknown dimension)."""
    if value.type.WhichOneof("value") != "tensor_type":
        raise UnsupportedModel(f"{what}: {role} {value.name!r} is a {value.type.WhichOneof('value')}, not a tensor")
    tensor_type = value.type.tensor_type
    dtype = _ELEMENT_TYPES.get(tensor_type.elem_type, (f"element type {tensor_type.elem_type}", 0))[0]
    shape: list[int | None] | None = None
    if tensor_type.HasField("shape"):
        shape = [int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None
                 for dim in tensor_type.shape.dim]
    return {"name": value.name, "dtype": dtype, "shape": shape}


FORMAT = Format(runtime="onnx", manifest_fields=_manifest_fields, check_fetched=check_fetched, store=store)
