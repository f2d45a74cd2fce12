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
* a **margin** for activations and the allocator: 10% of the weights (on a
  load: a request for a held model adds none) plus a fixed floor.

A generation also carries its KV cache apart (``Requirements.kv``), which the
ledger counts against its device's KV budget as well: the serving executor
shares the device among the requests it batches, and the budget is what
bounds how many run at once. Requests to a serving executor (inference,
generation, proofs) reserve a fraction of a core unless they name
``cpu_cores`` (``[worker.execution] serving_cpu_cores``) and share their GPU by
``gpu_memory`` unless they ask ``gpu_exclusive``; training keeps whole cores
and the node's ``gpu_sharing``.

For a GPU run the host still holds the runtime and, while loading, one
weights file at a time (transformers loads shard by shard), so host memory is
the floor plus the largest weights file, plus on a first load what the CUDA
runtime adds to the executor's host memory. An ONNX model (``runtime: onnx``)
keeps its own dtypes (its weights are the graph's tensor bytes on any device)
and, while loading, holds its file's bytes and onnxruntime's parse of them
beside the weights: a first load adds twice ``model.onnx``'s size to host
memory, on the CPU too. A LoRA adapter is sized on its base
(``requirements_for_model(base=...)``): the base's weights unless held, its KV cache,
plus the adapter's own bytes unless the adapter is held.

Training (the job executors, never cached) computes in float32 on every device
(:class:`Training`). A full fine-tune reserves weights, gradients and AdamW's two
moments: 4 x the float32 weights. LoRA reserves the frozen weights once plus 4 x
only the trainable (adapter and head) parameters, bounded from ``config.json``
(:func:`lora_trainable_bound`: ``r`` x (in + out) for each targeted projection
of each layer, taking the larger of hidden and intermediate size as ``out``,
plus a classifier head); when the config is not at hand it counts as a full
fine-tune. Activations: ``batch_size`` x ``max_length`` tokens x
34 x hidden x layers x 4 bytes (every layer's saved activations in float32,
no checkpointing), from the config's sizes; without them 16 x the float32
KV bytes per token (a causal LM), else :data:`TRAIN_TOKEN_FALLBACK`. Then the
margin and floors as for inference. Gradient accumulation does not grow it: one
micro-batch of ``batch_size`` is live at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypha_celery.config import WorkerConfig
from hypha_celery.manifest import Manifest, compute_dtype
from hypha_celery.resources.gpu import CUDA_CONTEXT, CUDA_HOST_RUNTIME
from hypha_celery.resources.requirements import Requirements, check_caps

__all__ = [
    "CHAT_MESSAGE_TOKENS",
    "DEVICE_FLOOR",
    "HOST_FLOOR",
    "TRAIN_TOKEN_FALLBACK",
    "Estimate",
    "Training",
    "estimate",
    "lora_trainable_bound",
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
# Activation bytes per trained token when neither the config's sizes nor a KV size are known.
TRAIN_TOKEN_FALLBACK = 1 << 20
_FP32 = 4


@dataclass(frozen=True)
class Training:
    """What sizes a training job: ``trainable`` parameters (None: all of them), tokens in one micro-batch,
    and activation bytes per token (None: estimated from the manifest)."""

    trainable: int | None = None
    tokens: int = 0
    activation_bytes_per_token: int | None = None


def _config_int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def activation_bytes_per_token(config: dict[str, Any] | None) -> int | None:
    """34 x hidden x layers x 4 bytes: a transformer layer's saved activations per token, float32."""
    if not config:
        return None
    hidden = _config_int(config, "hidden_size", "n_embd", "dim")
    layers = _config_int(config, "num_hidden_layers", "n_layer", "n_layers")
    return 34 * hidden * layers * _FP32 if hidden and layers else None


def lora_trainable_bound(config: dict[str, Any] | None, r: int, targets: int, labels: int = 0) -> int | None:
    """An upper bound on LoRA's trainable parameters from ``config.json``; None without the sizes."""
    if not config:
        return None
    hidden = _config_int(config, "hidden_size", "n_embd", "dim")
    layers = _config_int(config, "num_hidden_layers", "n_layer", "n_layers")
    if not hidden or not layers:
        return None
    wide = max(hidden, _config_int(config, "intermediate_size", "n_inner", "hidden_dim") or 4 * hidden)
    # peft trains a classifier's head too (modules_to_save): at most a dense layer and the output layer
    head = (hidden * hidden + hidden + (hidden + 1) * labels) if labels else 0
    return layers * targets * r * (hidden + wide) + head


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


def estimate(manifest: Manifest, *, gpu: bool, cached: bool, tokens: int = 0, training: bool | Training = False
             ) -> Estimate:
    """The memory one request on ``manifest`` needs; ``tokens``: KV-cache tokens (prompt + new).

    ``training``: a training job (``True``: a built-in model's, all parameters trained, no activations counted).
    """
    dtype = "float32" if training else compute_dtype("cuda" if gpu else "cpu")
    weights = manifest.weights_bytes_at(dtype)
    kv = 0 if training else (manifest.kv_bytes_per_token_at(dtype) or 0) * tokens
    margin = 0 if cached and not training else weights // 10
    if training:
        cached = False  # job executors start empty
        job = training if isinstance(training, Training) else Training()
        if job.trainable is None or manifest.memory is None:
            resident = 4 * weights  # weights, gradients, two optimizer moments
        else:
            resident = weights + 4 * min(job.trainable, manifest.memory.parameters) * _FP32
        per_token = job.activation_bytes_per_token or (16 * (manifest.kv_bytes_per_token_at("float32") or 0)) \
            or TRAIN_TOKEN_FALLBACK
        resident += job.tokens * per_token if job.tokens else 0
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
    req: Requirements, manifest: Manifest, *, cached: bool, tokens: int = 0, training: bool | Training = False
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
    training: bool | Training = False,
    base: Manifest | None = None,
    generation: bool = False,
) -> Requirements:
    """A task's ``requirements`` kwarg, sized for ``manifest`` and held to this worker's caps.

    Anything but ``training`` runs in a serving executor and shares its device (see the module's
    docstring); a ``generation`` carries its KV cache (``tokens`` of it) for the ledger's KV budget.

    ``base``: when ``manifest`` is a LoRA adapter, its base model's: the request needs the
    base's weights (unless held) and KV cache, plus the adapter's own bytes (unless held).

    ``memory``/``gpu_memory`` default to ``"auto"`` for transformers and ONNX models (built-in
    models keep the fixed default). ``holds(model, gpu)``: whether the serving
    executor the request would use already holds the model.
    """
    serving = None if training else round(cfg.execution.serving_cpu_cores * 1000)
    req = Requirements.parse(raw, auto_by_default=manifest.runtime in ("transformers", "onnx"),
                             serving_cpu_milli=serving)
    if generation and tokens:
        kv_model = base or manifest  # an adapter's KV cache is its base's
        per_token = kv_model.kv_bytes_per_token_at(compute_dtype("cuda" if req.gpus > 0 else "cpu")) or 0
        req = dataclasses.replace(req, kv=per_token * tokens)
    if req.auto:
        cached = not training and req.gpus <= 1 and holds(manifest.id, req.gpus > 0)
        if base is not None and not cached:  # an adapter not held yet: its base (unless held) plus its own bytes
            base_cached = req.gpus <= 1 and holds(base.id, req.gpus > 0)
            sizes = estimate(base, gpu=req.gpus > 0, cached=base_cached, tokens=tokens)
            adapter = manifest.weights_bytes_at(compute_dtype("cuda" if req.gpus > 0 else "cpu"))
            req = req.sized(memory=sizes.host + (0 if req.gpus > 0 else adapter),
                            gpu_memory=sizes.device + (adapter if req.gpus > 0 else 0))
        elif base is not None:
            req = size_requirements(req, base, cached=True, tokens=tokens)
        else:
            req = size_requirements(req, manifest, cached=cached, tokens=tokens, training=training)
    check_caps(req, max_memory_per_task=cfg.max_memory_per_task, max_cpu_cores_per_task=cfg.max_cpu_cores_per_task)
    return req
