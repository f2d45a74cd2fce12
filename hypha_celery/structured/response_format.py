"""``response_format``, OpenAI's shape: what a generation's output must be, checked on both sides of the run.

Before the run (the validation stage): the argument's shape, a schema within :data:`MAX_SCHEMA_BYTES` and
:data:`MAX_SCHEMA_DEPTH`, a valid JSON Schema (``jsonschema``), and one the grammar engine implements (a refusal
names the keywords it does not). After the run (:func:`check_output`): the text parses, and validates against the
schema, or the task fails with :class:`~hypha_celery.errors.InvalidOutput`: never a SUCCESS with invalid JSON.
Both need the ``[structured]`` extra; without it a response_format is refused with
:class:`~hypha_celery.errors.FeatureUnavailable`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Mapping
from typing import Any

from hypha_celery.errors import FeatureUnavailable, InvalidOutput, InvalidTask

__all__ = [
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "check_output",
    "check_schema",
    "grammar_options",
    "require_extra",
    "schema_of",
]

MAX_SCHEMA_BYTES = 64 * 1024  # a schema compiles into a grammar in the executor: bound the work a client can ask
MAX_SCHEMA_DEPTH = 32
EXTRA_MODULES = ("llguidance", "jsonschema")

def grammar_options() -> dict[str, Any]:
    """The JSON grammar's options: compact separators, no free whitespace (a model cannot pad forever)."""
    return {"whitespace_flexible": False}


def require_extra() -> None:
    """Refuse structured output on a worker without the ``[structured]`` extra (found without importing it)."""
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise FeatureUnavailable(f"response_format needs the [structured] extra on this worker (missing: "
                                 f"{', '.join(missing)}): pip install 'hypha-celery[structured]'")


def schema_of(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The JSON Schema an output must satisfy; None for plain text. ``json_object``: any object."""
    if response_format is None or response_format["type"] == "text":
        return None
    if response_format["type"] == "json_object":
        return {"type": "object"}
    return dict(response_format.get("json_schema", {}).get("schema") or {})


def check_schema(schema: dict[str, Any]) -> None:
    """Refuse (``InvalidTask``) a schema too large, too deep, no valid JSON Schema, or using what the grammar
    engine does not implement (its message names the keywords)."""
    require_extra()
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise InvalidTask(f"response_format.json_schema.schema is {size} bytes as JSON, above {MAX_SCHEMA_BYTES}")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise InvalidTask(f"response_format.json_schema.schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    _check_schema(schema)


def _depth(value: Any) -> int:
    if isinstance(value, Mapping):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _check_schema(schema: dict[str, Any]) -> None:
    """A valid JSON Schema, which the grammar engine implements whole (it names the keywords it does not)."""
    jsonschema = importlib.import_module("jsonschema")
    llguidance = importlib.import_module("llguidance")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidTask(f"response_format.json_schema.schema is no valid JSON Schema: {exc.message}") from None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=grammar_options())
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, RuntimeError) as exc:
        error = str(exc)
    if error:
        raise InvalidTask(f"response_format.json_schema.schema uses what structured output does not support: "
                          f"{error}")


def check_output(text: str, response_format: Mapping[str, Any] | None, finish_reason: str = "stop") -> Any:
    """The parsed output when it satisfies ``response_format`` (None for plain text), else ``InvalidOutput``."""
    schema = schema_of(response_format)
    if schema is None:
        return None
    cut = " (it ran out of max_new_tokens before the JSON was complete)" if finish_reason == "length" else ""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidOutput(f"the output is not JSON{cut}: {exc}") from None
    jsonschema = importlib.import_module("jsonschema")
    errors = sorted(jsonschema.validators.validator_for(schema)(schema).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "(root)"
        raise InvalidOutput(f"the output breaks response_format's schema at {where}: {errors[0].message}{cut}")
    return value
