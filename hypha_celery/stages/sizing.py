"""Sizing: what ``"auto"`` memory and gpu_memory come to for one request, from the manifest alone.

Runs after validation and before admission, so the ledger reserves what the
request will really use and a request that cannot fit is refused by
admission, never by an out-of-memory kill. Nothing here imports torch or
transformers: the sizes come from the manifest's memory estimate (read from
the safetensors headers at import) and the request's own arguments.

On the device the model runs on (its compute dtype: bf16 on CUDA, fp32 on CPU):

* **weights** at the compute dtype, unless that device's serving executor
  already holds the model (the model cache's own ledger account covers it);
  on a GPU's first load, the **CUDA context** too;
* **KV cache** for the prompt plus ``max_new_tokens`` (text generation):
  ``kv_bytes_per_token`` x tokens. The prompt's tokens are bounded by its
  UTF-8 bytes (a byte-level tokenizer never makes more tokens than bytes),
  plus a per-message allowance for chat templates, and capped at the model's
  maximum length;
* a **margin** for activations and the allocator: 10% of the weights plus a
  fixed floor.

For a GPU run the host still holds the runtime and, while loading, one
weights file at a time (transformers loads shard by shard), so host memory is
the floor plus the largest weights file, plus on a first load what the CUDA
runtime adds to the executor's host memory. An ONNX model (``runtime: onnx``)
keeps its own dtypes (its weights are the graph's tensor bytes on any device)
and, while loading, holds its file's bytes and onnxruntime's parse of them
beside the weights: a first load adds twice ``model.onnx``'s size to host
memory, on the CPU too. Training (the job executors, never
cached) reserves weights, gradients and two optimizer moments: 4 x the
weights, plus the margin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypha_celery.config import WorkerConfig
from hypha_celery.models.manifest import Manifest, compute_dtype
from hypha_celery.resources.gpu import CUDA_CONTEXT, CUDA_HOST_RUNTIME
from hypha_celery.resources.requirements import Requirements, check_caps

__all__ = [
    "CHAT_MESSAGE_TOKENS",
    "DEVICE_FLOOR",
    "HOST_FLOOR",
    "Estimate",
    "estimate",
    "prompt_token_bound",
    "requirements_for_model",
    "size_requirements",
]

# Host memory a serving or job executor grows by for one request beyond its weights:
# the transformers runtime, tokenizer, activations of a small batch.
HOST_FLOOR = 256 * 2**20
# The same on the device: the caching allocator's blocks and activations.
DEVICE_FLOOR = 64 * 2**20
# Tokens a chat template adds around one message (role markers, separators).
CHAT_MESSAGE_TOKENS = 16
# Special tokens a tokenizer may add around a plain prompt.
_PROMPT_EXTRA_TOKENS = 8


@dataclass(frozen=True)
class Estimate:
    """Bytes one request needs on the host and on each GPU it uses."""

    host: int
    device: int


def prompt_token_bound(prompt: str | None, messages: list[dict[str, str]] | None, max_length: int | None) -> int:
    """An upper bound on a prompt's tokens, without its tokenizer."""
    if prompt is not None:
        tokens = len(prompt.encode("utf-8", "surrogatepass")) + _PROMPT_EXTRA_TOKENS
    else:
        tokens = sum(len(m.get("content", "").encode("utf-8", "surrogatepass")) + CHAT_MESSAGE_TOKENS
                     for m in messages or []) + _PROMPT_EXTRA_TOKENS
    return min(tokens, max_length) if max_length else tokens


def estimate(manifest: Manifest, *, gpu: bool, cached: bool, tokens: int = 0, training: bool = False) -> Estimate:
    """The memory one request on ``manifest`` needs; ``tokens``: KV-cache tokens (prompt + new)."""
    dtype = compute_dtype("cuda" if gpu else "cpu")
    weights = manifest.weights_bytes_at(dtype)
    kv = (manifest.kv_bytes_per_token_at(dtype) or 0) * tokens
    margin = weights // 10
    if training:
        cached = False  # job executors start empty
        resident = 4 * weights  # weights, gradients, two optimizer moments
    else:
        resident = 0 if cached else weights
    largest_file = max((manifest.files[name].size for name in manifest.weights_files), default=0)
    loading = 0 if cached or manifest.runtime != "onnx" else 2 * largest_file
    if not gpu:
        return Estimate(host=resident + kv + margin + HOST_FLOOR + loading, device=0)
    context = 0 if cached else CUDA_CONTEXT
    return Estimate(host=HOST_FLOOR + loading + (0 if cached else largest_file + CUDA_HOST_RUNTIME),
                    device=resident + context + kv + margin + DEVICE_FLOOR)


def size_requirements(
    req: Requirements, manifest: Manifest, *, cached: bool, tokens: int = 0, training: bool = False
) -> Requirements:
    """``req`` with its ``"auto"`` fields sized for ``manifest``; fields given as numbers stay as asked."""
    if not req.auto:
        return req
    sizes = estimate(manifest, gpu=req.gpus > 0, cached=cached, tokens=tokens, training=training)
    return req.sized(memory=sizes.host, gpu_memory=sizes.device)


def requirements_for_model(
    cfg: WorkerConfig,
    raw: Any,
    manifest: Manifest,
    *,
    holds: Callable[[str, bool], bool],
    tokens: int = 0,
    training: bool = False,
) -> Requirements:
    """A task's ``requirements`` kwarg, sized for ``manifest`` and held to this worker's caps.

    ``memory``/``gpu_memory`` default to ``"auto"`` for transformers and ONNX models (built-in
    models keep the fixed default). ``holds(model, gpu)``: whether the serving
    executor the request would use already holds the model.
    """
    req = Requirements.parse(raw, auto_by_default=manifest.runtime in ("transformers", "onnx"))
    if req.auto:
        cached = not training and req.gpus <= 1 and holds(manifest.id, req.gpus > 0)
        req = size_requirements(req, manifest, cached=cached, tokens=tokens, training=training)
    check_caps(req, max_memory_per_task=cfg.max_memory_per_task, max_cpu_cores_per_task=cfg.max_cpu_cores_per_task)
    return req
