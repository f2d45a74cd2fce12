"""The worker's TOML schema: every key declared once, with its kind and checks.

The file has the seed's sections (``[worker]``, ``[worker.network]``,
``[worker.models]``, ``[worker.execution]``, ``[worker.monitoring]``,
``[worker.security]``) plus four hypha sections (``[worker.resources]``,
``[worker.admission]``, ``[worker.batching]``, ``[worker.generation]``, ``[worker.training]``), and
``[worker.gateway]`` for ``hypha-celery gateway``. :mod:`.parse` reads a file
against these declarations; :mod:`.derive` turns a config into Celery settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_BROKER_URL",
    "EX_CONFIG",
    "KILL_GRACE_S",
    "AdmissionConfig",
    "BatchingConfig",
    "ExecutionConfig",
    "GatewayConfig",
    "GenerationConfig",
    "ModelSource",
    "ModelsConfig",
    "MonitoringConfig",
    "NetworkConfig",
    "ResourcesConfig",
    "SecurityConfig",
    "TrainingConfig",
    "WorkerConfig",
]

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
EX_CONFIG = 78  # sysexits.h: configuration error; systemd units stop restarting on it

# Seconds between SIGTERM and SIGKILL when a task overruns ``task_timeout``.
KILL_GRACE_S = 3.0


def _key(kind: str, default: Any, **rules: Any) -> Any:
    """Declare one config key: its kind drives parsing, ``rules`` its checks."""
    meta = {"kind": kind, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSource:
    """One ``[[worker.models.sources]]`` entry, tried in order."""

    type: str
    path: str | None = None
    url: str | None = None
    bucket: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    prefix: str = ""


@dataclass(frozen=True)
class NetworkConfig:
    gateway_addresses: list[str] = _key("urls", [])
    advertisement_interval: float = _key("seconds", 60.0)
    result_backend: str | None = _key("url?", None)
    registry_url: str | None = _key("url?", None)
    # "quorum": the shared queue is a RabbitMQ quorum queue (replicated); the Redis transport ignores it.
    shared_queue_type: str = _key("str", "classic", choices=("classic", "quorum"))


@dataclass(frozen=True)
class ModelsConfig:
    model_dir: str = _key("str", "/var/lib/hypha/models")
    sources: list[ModelSource] = _key("sources", [])
    # 20 GB: an 8B-parameter model in bf16 (what Llama-3-8B, Mistral-7B and Qwen2-7B publish) is 16 GB of
    # safetensors plus its tokenizer; a 13B one in bf16 (26 GB) needs a raised cap. It equals
    # model_cache_size's default, so the parse check (a fetched model must be cacheable) holds by default.
    max_model_size: int = _key("size", 20 * 10**9)
    # Models the serving executors load at boot, before the worker takes tasks (ids in the store or its sources).
    preload: list[str] = _key("strs", [])


@dataclass(frozen=True)
class ExecutionConfig:
    isolation_mode: str = _key("str", "process", choices=("process", "container", "vm"))
    sandbox_enabled: bool = _key("bool", True)
    cpu_priority: str = _key("str", "normal", choices=("low", "normal", "high"))
    # Training and hypha.noop on a GPU: false holds the device alone, true shares it by gpu_memory. Requests to a
    # serving executor (infer, generate, verify) share their device either way unless they ask gpu_exclusive.
    gpu_sharing: bool = _key("bool", False)
    # What a request to a serving executor reserves of the CPU when it names no cpu_cores: a fraction of the shared
    # pool (the executor batches the requests of its device; a whole core each would cap them at one per core).
    serving_cpu_cores: float = _key("cores", 0.1)
    # Start each device's serving executor (torch imported) at boot, so the first request is not cold.
    prewarm: bool = _key("bool", True)


@dataclass(frozen=True)
class MonitoringConfig:
    monitor_interval: float = _key("seconds", 5.0)
    collect_metrics: bool = _key("bool", True)
    metrics_port: int = _key("port", 9091)


@dataclass(frozen=True)
class SecurityConfig:
    verify_task_signatures: bool = _key("bool", True)
    allowed_schedulers: list[str] = _key("strs", [])
    enforce_memory_limits: bool = _key("bool", True)
    enforce_cpu_limits: bool = _key("bool", True)
    max_input_bytes: int = _key("size", 64 * 2**20)
    # The most UTF-8 bytes one text (a prompt, a text to embed or classify, a training text) may have before a
    # tokenizer sees it. "auto" (None): per model, 16 bytes a token of its maximum length plus 4 KiB
    # (models.text_inputs); a size: that bound for every model.
    max_text_bytes: int | None = _key("size|auto", None)
    max_envelope_age: float = _key("seconds", 3600.0)
    # The worker's Ed25519 identity (a `hypha-celery keys generate` file); None: worker.key beside model_dir,
    # made at first start. With sign_results, every hypha task's result carries its signed attestation.
    identity_key: str | None = _key("str?", None)
    sign_results: bool = _key("bool", True)


@dataclass(frozen=True)
class ResourcesConfig:
    node_id: str | None = _key("str?", None)
    cpu_cores: int | None = _key("count?", None)
    memory: int | None = _key("size?", None)
    gpus: list[int] | None = _key("indices?", None)
    lease_heartbeat: float = _key("seconds", 5.0)


@dataclass(frozen=True)
class AdmissionConfig:
    max_wait: float = _key("seconds", 600.0)
    backoff_initial: float = _key("seconds", 0.5)
    backoff_max: float = _key("seconds", 10.0)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = _key("count", 32)
    max_queue_delay_microseconds: int = _key("count0", 2000)


@dataclass(frozen=True)
class GenerationConfig:
    # Most tokens one hypha.generate request may ask for: bounds its KV cache and its run time.
    max_new_tokens: int = _key("count", 512)
    # Most entries a generation's token stream keeps (XADD MAXLEN ~, hypha_celery.token_stream): an entry holds
    # at least one token, so a stream is whole while max_new_tokens stays below it.
    stream_maxlen: int = _key("count", 4096)
    # The KV-cache bytes each device (the CPU, each GPU) admits at once; a generation that does not fit waits
    # (deferred). "auto" (None): the device's memory less what its model caches hold, less a tenth as headroom.
    kv_budget: int | None = _key("size|auto", None)
    # "continuous": a transformers causal LM's generations join its running batch at the next decode step
    # (hypha_celery.executor.continuous); "static": batches of equal settings run until their longest row ends.
    batching: str = _key("str", "continuous", choices=("continuous", "static"))
    # Bytes of prompt-prefix KV each serving engine keeps (hypha_celery.serving.prefix): requests that share a
    # prefix (a system prompt, few-shot examples) copy it instead of computing it again. Executor memory held
    # within the KV budget's headroom; "off" (0) turns reuse off.
    prefix_cache: int = _key("size|off", 64 * 2**20)


@dataclass(frozen=True)
class TrainingConfig:
    # Where DiLoCo rounds keep pseudo-gradients, outer momentum and global model versions: a writable
    # {type = "local", path} or {type = "s3", bucket, region, endpoint_url, prefix}. None: no DiLoCo here.
    shared_storage: ModelSource | None = _key("storage?", None)


@dataclass(frozen=True)
class GatewayConfig:
    # `hypha-celery gateway`, the OpenAI-compatible HTTP front (hypha_celery.gateway); its options override these.
    host: str = _key("str", "127.0.0.1")
    port: int = _key("port", 8000)
    # The scheduler key the gateway signs every task with (a `hypha-celery keys generate` file); None: unsigned.
    key: str | None = _key("str?", None)
    # Bearer keys, one a line: the key or sha256:<hex> of it. None: the gateway takes requests without a key.
    api_keys: str | None = _key("str?", None)
    # Requests a minute per API key (a token bucket in the registry Redis), at most `burst` at once; 0: no limit.
    rate_limit: int = _key("count0", 600)
    burst: int = _key("count", 60)
    # How long a request waits for its task's result before a 504.
    timeout: float = _key("seconds", 300.0)


@dataclass(frozen=True)
class WorkerConfig:
    """The whole ``[worker]`` table; defaults are the seed's example values."""

    max_concurrent_tasks: int = _key("count", 4)
    max_memory_per_task: int = _key("size", 8 * 10**9)
    max_cpu_cores_per_task: int = _key("count", 4)
    task_timeout: float = _key("seconds", 300.0)
    model_cache_size: int = _key("size", 20 * 10**9)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    source_path: str | None = field(default=None, compare=False)

    @property
    def soft_time_limit(self) -> float:
        """Celery's soft limit: past our own kill (task_timeout + grace), a backstop."""
        return self.task_timeout + KILL_GRACE_S + 5.0

    @property
    def hard_time_limit(self) -> float:
        return self.task_timeout + KILL_GRACE_S + 15.0

    @property
    def visibility_timeout(self) -> int:
        """Longest a Redis-delivered message may stay unacked before redelivery.

        A message is unacked while it waits out an admission backoff (at most
        ``backoff_max``) and while it runs (at most the hard limit); Celery
        #5935 is what happens when this is shorter than a run.
        """
        return math.ceil(self.hard_time_limit + self.admission.backoff_max + 10.0)


SECTIONS = {
    "network": NetworkConfig,
    "models": ModelsConfig,
    "execution": ExecutionConfig,
    "monitoring": MonitoringConfig,
    "security": SecurityConfig,
    "resources": ResourcesConfig,
    "admission": AdmissionConfig,
    "batching": BatchingConfig,
    "generation": GenerationConfig,
    "training": TrainingConfig,
    "gateway": GatewayConfig,
}

SOURCE_KEYS = {
    "local": {"path"},
    "http": {"url"},
    "s3": {"bucket", "region", "endpoint_url", "prefix"},
}
