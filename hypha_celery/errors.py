"""Every error hypha-celery raises, in one tree.

    HyphaError
     ├── ConfigError                    a worker config key is wrong; names the key
     ├── InvalidSignature               a task envelope or a result's attestation failed verification
     ├── InvalidTask                    kwargs do not fit the task: an argument unknown, mistyped, out of bounds
     │    ├── InvalidInput              inputs malformed, wrong shape or too large
     │    │    └── DeltaRejected        a DiLoCo pseudo-gradient failed its checks (sha256, shape, job, round)
     │    └── MalformedMessage          the message is no task message (undecodable, wrong shape)
     ├── UnsupportedModel               model id unknown, malformed or unverifiable
     │    └── ModelPinMismatch          the store holds another manifest than the task pinned
     ├── ModelTooLarge                  a model larger than the whole model cache
     ├── InsufficientCapabilities       no live worker can ever fit the request
     │    ├── InsufficientCpu           more cores than a task may hold here
     │    ├── InsufficientGpuMemory     more GPU memory than a device here has
     │    └── ExcessiveMemoryRequest    more memory than a task may hold here
     ├── ResourcesBusy                  fits, but not now (admission backs off)
     │    └── AdmissionTimeout          waited past the admission bound
     ├── MemoryLimitExceeded            the task used more memory than reserved
     ├── TaskTimeout                    the task ran past task_timeout
     ├── ExecutorCrashed                the task's process died without an answer
     ├── ExecutionError                 the task's own ML code raised (e.g. a torch error)
 ├── InvalidOutput                  a generation's output breaks its response_format (not JSON, off the schema)
 ├── FeatureUnavailable             the task asks for what this worker lacks the extra for (response_format)
     ├── RegistryUnavailable            Redis (registry/ledger) cannot be reached
     ├── SharedStorageError             DiLoCo's shared storage failed (missing object, unreachable, bad sha256)
     ├── RoundFailed                    a DiLoCo round ended with fewer than min_workers deltas
     └── ControlFlow                    steers a task at admission; never a task's result
          ├── DuplicateTask             a live lease already runs this task id (a redelivered copy)
          └── NotHere                   this node can never fit the task; another live node can

Each class above ``ControlFlow`` takes one message string so that Celery's
JSON result backend can rebuild it on the client (``exc_type`` carries the
class name). The ``ControlFlow`` branch is what Celery's ``Ignore``/``Retry``
are to Celery: the pipeline turns them into a deferral or a dropped copy, so
they never reach a result backend.
"""

from __future__ import annotations

__all__ = [
    "AdmissionTimeout",
    "ConfigError",
    "ControlFlow",
    "DeltaRejected",
    "DuplicateTask",
    "ExcessiveMemoryRequest",
    "ExecutionError",
    "ExecutorCrashed",
    "FeatureUnavailable",
    "HyphaError",
    "InsufficientCapabilities",
    "InsufficientCpu",
    "InsufficientGpuMemory",
    "InvalidInput",
    "InvalidOutput",
    "InvalidSignature",
    "InvalidTask",
    "MalformedMessage",
    "MemoryLimitExceeded",
    "ModelPinMismatch",
    "ModelTooLarge",
    "NotHere",
    "RegistryUnavailable",
    "ResourcesBusy",
    "RoundFailed",
    "SharedStorageError",
    "TaskTimeout",
    "UnsupportedModel",
    "contained",
    "rebuilt",
]


class HyphaError(Exception):
    """Root of every hypha-celery error."""


class ConfigError(HyphaError):
    """A worker configuration key is missing, mistyped or cannot be honoured."""

    def __init__(self, key: str, reason: str | None = None) -> None:
        # Rebuilt from its message alone by Celery's result backend.
        message = key if reason is None else f"{key}: {reason}"
        super().__init__(message)
        self.key = key if reason is not None else message.split(":", 1)[0]
        self.reason = reason if reason is not None else message.partition(": ")[2]


class InvalidSignature(HyphaError):
    """A task's signed envelope, or a result's attestation, is missing, forged, expired, replayed or mismatched."""


class InvalidTask(HyphaError):
    """The task's keyword arguments do not fit it: one is positional, unknown, missing, of the wrong type or out of
    bounds (the message names it), or the model takes other arguments.

    The one error of an argument a client got wrong (:mod:`hypha_celery.stages.validation.arguments`); what an
    argument holds for the model to read is :class:`InvalidInput`.
    """


class InvalidInput(InvalidTask):
    """The inputs are malformed, of the wrong shape, or over the size cap."""


class DeltaRejected(InvalidInput):
    """A DiLoCo pseudo-gradient is not what its inner task reported, or not for this job, round or base."""


class MalformedMessage(InvalidTask):
    """The message cannot be a task: its body does not decode, or is not ``[args, kwargs, options]``."""


class UnsupportedModel(HyphaError):
    """The model id is unknown here, malformed, or failed verification."""


class ModelPinMismatch(UnsupportedModel):
    """The task pins its model by a manifest sha256 that this worker's store entry for the id does not have."""


class ModelTooLarge(HyphaError):
    """The model needs more memory than the whole model cache holds."""


class InsufficientCapabilities(HyphaError):
    """No worker seen in the registry could ever fit this request."""


class InsufficientCpu(InsufficientCapabilities):
    """More CPU cores than a task may hold on this worker."""


class InsufficientGpuMemory(InsufficientCapabilities):
    """More GPUs or GPU memory than any device on this worker has."""


class ExcessiveMemoryRequest(InsufficientCapabilities):
    """More memory than ``max_memory_per_task`` allows."""


class ResourcesBusy(HyphaError):
    """The request fits this node, but not with what is reserved right now."""


class AdmissionTimeout(ResourcesBusy):
    """The task waited for resources longer than the admission bound."""


class MemoryLimitExceeded(HyphaError):
    """The task tried to use more memory than it reserved."""


class TaskTimeout(HyphaError):
    """The task ran past ``task_timeout`` and was killed."""


class ExecutorCrashed(HyphaError):
    """The process running the task's ML work died without an answer."""


class ExecutionError(HyphaError):
    """The task's own ML code raised (a model that cannot take these inputs, a torch error)."""


class InvalidOutput(HyphaError):
    """A generation's output is not what its ``response_format`` asks (not JSON, or off the schema): never SUCCESS."""


class FeatureUnavailable(HyphaError):
    """The task asks for a feature this worker lacks the extra for (``response_format`` without ``[structured]``)."""


class RegistryUnavailable(HyphaError):
    """The registry / ledger Redis could not be reached."""


class SharedStorageError(HyphaError):
    """The shared storage of DiLoCo deltas and model versions failed: an object is missing, unreadable or altered."""


class RoundFailed(HyphaError):
    """A DiLoCo round could not complete: fewer than ``min_workers`` deltas arrived before its deadline."""


def contained(exc: BaseException) -> bool:
    """Whether one request's failure may end that request alone, its process (and model cache) serving on.

    Every ``Exception``, and a panic in a Rust extension (tokenizers, safetensors): pyo3 unwinds it into a
    ``PanicException`` that derives from ``BaseException`` (so ``except Exception`` misses it) and leaves the
    library's objects as they were. ``SystemExit``, ``KeyboardInterrupt`` and ``GeneratorExit`` are not contained.
    """
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class ControlFlow(HyphaError):
    """Steers a task at admission (defer it, drop a copy, forward it); not an error of the task."""


class DuplicateTask(ControlFlow):
    """A live lease already runs this task id: a second delivery must not run it twice."""

    def __init__(self, task_id: str, lease_id: str, holder: str) -> None:
        super().__init__(f"task {task_id} is already running under lease {lease_id} ({holder})")
        self.task_id, self.lease_id, self.holder = task_id, lease_id, holder


class NotHere(ControlFlow):
    """This node can never fit the task, but a live worker elsewhere can: ``queue`` is its own queue."""

    def __init__(self, message: str, queue: str) -> None:
        super().__init__(message)
        self.queue = queue


def rebuilt(name: str, message: str) -> HyphaError | None:
    """The hypha error class ``name`` rebuilt from ``message``, as another process (an executor, a token stream's
    end entry) named it; None for a name that is not one built from a message alone (configuration errors, control
    flow, anything else): the reader then reports it as an :class:`ExecutionError` of its own."""
    cls = globals().get(name) if name in __all__ else None
    if not (isinstance(cls, type) and issubclass(cls, HyphaError)) or issubclass(cls, (ConfigError, ControlFlow)):
        return None
    return cls(message)
