"""Running stored ONNX models with onnxruntime: load, infer (batched along the graph's batch axis).

Used inside executor processes only, through :mod:`.registry` (imported when a
``runtime: onnx`` model is loaded). :func:`load` reads
``model.onnx`` once into memory, checks those bytes' sha256 against the
manifest and their graph with :func:`hypha_celery.formats.onnx.describe_bytes` (no external
data, no custom-op domains, the same input, outputs and batch axis as the
manifest), and only then hands the same bytes to onnxruntime: what runs is
what was checked, and onnxruntime is never given a path it could resolve
external data against. No custom-op library is ever registered.

Execution providers: the CPU one; on a CUDA device the CUDA one (then CPU for
the operators CUDA lacks), which needs onnxruntime-gpu: a CPU-only
onnxruntime refuses a GPU lease rather than run on the host memory the lease
did not reserve. The CPU thread pool gets the cores the executor is pinned to
when the model loads, without spinning, and no CPU memory arena (freed
activations return to the system, so the job's memory cap measures real use).

Inputs and outputs use the built-in models' forms (a nested list, or the
encoded tensor object: :mod:`.codec` decodes and encodes them). A batchable
graph runs every item's rows as one batch; a graph without a dynamic batch
axis runs one sample at a time. A graph with one output answers in that
output's form; with several, an object keyed by output name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hypha_celery.errors import ExecutionError, UnsupportedModel
from hypha_celery.formats.onnx import describe_bytes
from hypha_celery.manifest import ONNX_FILE, Manifest
from hypha_celery.models.store import Entry
from hypha_celery.runtimes.codec import decode, encode, is_single

__all__ = ["OnnxModel", "infer_batch", "load"]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


@dataclass
class OnnxModel:
    session: Any  # onnxruntime.InferenceSession
    manifest: Manifest
    providers: list[str]

    @property
    def input_name(self) -> str:
        return str(self.manifest.config["inputs"][0]["name"])

    @property
    def output_names(self) -> list[str]:
        return [str(output["name"]) for output in self.manifest.config["outputs"]]


def load(entry: Entry, device: str, *, trainable: bool = False) -> tuple[OnnxModel, int]:
    """Check the verified ``entry``'s graph and open an onnxruntime session on ``device``; returns it and its weights' bytes.

    ``trainable`` is refused: an ONNX graph is served, never trained.
    """
    manifest, model_id = entry.manifest, entry.id
    if trainable:
        raise UnsupportedModel(f"model {model_id!r}: an ONNX model serves hypha.infer only; it cannot be trained")
    data = entry.file(ONNX_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.files[ONNX_FILE].sha256:
        raise UnsupportedModel(f"model {model_id!r}: {ONNX_FILE} changed after it was verified; refusing to load it")
    described = describe_bytes(data, f"model {model_id!r}")
    claimed = {key: getattr(manifest, key) for key in described.fields()}
    if claimed != described.fields():
        raise UnsupportedModel(f"model {model_id!r}: manifest disagrees with its graph")
    try:
        import onnxruntime as ort
    except ImportError:
        raise UnsupportedModel(f"model {model_id!r} is an ONNX model; this worker lacks the [onnx] extra") from None

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, len(os.sched_getaffinity(0)))
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False  # freed activations go back to the system: the job's memory cap sees real use
    options.log_severity_level = 3
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UnsupportedModel(f"model {model_id!r}: this worker's onnxruntime has no CUDA execution provider "
                                   "(install onnxruntime-gpu), so it cannot run on the GPU this task leased; "
                                   "ask for gpus: 0")
        index = int(device.partition(":")[2] or 0)
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for invalid graphs
        raise UnsupportedModel(f"model {model_id!r}: onnxruntime cannot load the graph: {exc}"[:1000]) from None
    del data
    assert manifest.memory is not None
    return OnnxModel(session, manifest, list(session.get_providers())), manifest.memory.weights_bytes


def infer_batch(model: OnnxModel, items: Sequence[Any], per_item: Sequence[Any] | None = None) -> list[Any]:
    """Answer every item: one run over all their rows when the graph batches, else one run per sample.

    ``per_item`` is for runtimes with adapters; a graph has none.
    """
    manifest = model.manifest
    shape = manifest.input_shape
    tensors = [decode(item, shape, _TORCH_DTYPES[manifest.dtype]) for item in items]
    counts = [int(t.shape[0]) for t in tensors]
    rows = np.ascontiguousarray(torch.cat(tensors).numpy())
    if manifest.batchable:
        outputs = model.session.run(model.output_names, {model.input_name: rows})
    else:
        outputs = _one_sample_at_a_time(model, rows)
    total = sum(counts)
    for name, output in zip(model.output_names, outputs, strict=True):
        if not isinstance(output, np.ndarray) or output.ndim == 0 or output.shape[0] != total:
            got = getattr(output, "shape", type(output).__name__)
            raise ExecutionError(f"model {manifest.id!r}: output {name!r} has shape {got}; "
                                 f"expected {total} rows along axis 0, one per input sample")
    split = [torch.split(torch.from_numpy(np.ascontiguousarray(output)), counts) for output in outputs]
    answers = []
    for index, item in enumerate(items):
        single = is_single(item, shape)
        parts = [encode(by_output[index], item, single) for by_output in split]
        answers.append(parts[0] if len(parts) == 1 else dict(zip(model.output_names, parts, strict=True)))
    return answers


def _one_sample_at_a_time(model: OnnxModel, rows: np.ndarray) -> list[np.ndarray]:
    """A graph with a fixed input shape: each sample alone (with its batch axis of 1 when the graph has one)."""
    batch_axis = model.manifest.config["batch_axis"]
    runs = []
    for row in rows:
        feed = row[np.newaxis] if batch_axis == 0 else row
        result = model.session.run(model.output_names, {model.input_name: np.ascontiguousarray(feed)})
        runs.append([np.asarray(out) if batch_axis == 0 else np.asarray(out)[np.newaxis] for out in result])
    return [np.concatenate([run[i] for run in runs]) for i in range(len(model.output_names))]
