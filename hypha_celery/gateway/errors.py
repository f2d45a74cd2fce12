"""OpenAI's error shape and the one table that maps hypha's named errors to HTTP statuses.

Every error the gateway answers is an :class:`ApiError`: its body is OpenAI's
``{"error": {"message", "type", "param", "code"}}``, so an OpenAI SDK raises the
exception class it raises for OpenAI itself (``BadRequestError`` for 400,
``AuthenticationError`` for 401, ``NotFoundError`` for 404, ``RateLimitError`` for
429, ``InternalServerError`` for 5xx). A task's failure comes back from Celery as
one of :mod:`hypha_celery.errors`' classes (rebuilt by name from the result backend);
:func:`from_exception` finds its status in :data:`STATUSES` by walking its class's
ancestry, so a new subclass inherits its parent's status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["STATUSES", "ApiError", "from_exception", "invalid", "unsupported"]


@dataclass
class ApiError(Exception):
    """One error answer: its HTTP status and OpenAI's four fields."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI answers with."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> ApiError:
    """A 400 naming the request parameter that is wrong."""
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


def unsupported(param: str, why: str = "") -> ApiError:
    """A 400 for a parameter this gateway cannot honour (never silently ignored)."""
    return ApiError(400, f"unsupported parameter: {param!r} is not supported by this gateway" + (f" ({why})" if why else ""),
                    param=param, code="unsupported_parameter")


# hypha error class name -> (HTTP status, OpenAI error type, code). Names, not classes: the result backend rebuilds a
# worker's exception by name, and a client without the class installed gets a look-alike with the same name.
STATUSES: dict[str, tuple[int, str, str]] = {
    "InvalidTask": (400, "invalid_request_error", "invalid_request"),
    "InvalidInput": (400, "invalid_request_error", "invalid_input"),
    "MalformedMessage": (400, "invalid_request_error", "invalid_request"),
    "UnsupportedModel": (404, "invalid_request_error", "model_not_found"),
    "ModelPinMismatch": (409, "invalid_request_error", "model_pin_mismatch"),
    "ModelTooLarge": (503, "server_error", "model_too_large"),
    "InsufficientCapabilities": (503, "server_error", "insufficient_capabilities"),
    "ResourcesBusy": (503, "server_error", "resources_busy"),
    "MemoryLimitExceeded": (500, "server_error", "memory_limit_exceeded"),
    "TaskTimeout": (504, "server_error", "timeout"),
    "TimeoutError": (504, "server_error", "timeout"),  # celery.exceptions.TimeoutError: no result in time
    "ExecutorCrashed": (500, "server_error", "executor_crashed"),
    "ExecutionError": (500, "server_error", "execution_error"),
    "RegistryUnavailable": (503, "server_error", "registry_unavailable"),
    "InvalidSignature": (502, "server_error", "invalid_signature"),
    "HyphaError": (500, "server_error", "internal_error"),
}


def from_exception(exc: BaseException) -> ApiError:
    """The answer for an exception a submission or a task raised: the first class in its ancestry that
    :data:`STATUSES` names; anything else is a 500 that names only its class (no traceback leaves the gateway)."""
    if isinstance(exc, ApiError):
        return exc
    for cls in type(exc).__mro__:
        found = STATUSES.get(cls.__name__)
        if found is not None:
            status, kind, code = found
            return ApiError(status, str(exc) or cls.__name__, type=kind, code=code)
    return ApiError(500, f"internal error ({type(exc).__name__})", type="server_error", code="internal_error")
