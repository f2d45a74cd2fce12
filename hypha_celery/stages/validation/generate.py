"""``hypha.generate``'s arguments: a model, ``prompt`` (a string) or ``messages`` (chat turns), sampling settings.

``messages`` are rendered with the model's chat template, so only for a model that has one. Each sampling
setting is declared with its type and range (:func:`generate_args`, read into :class:`GenerateParams`);
``max_new_tokens`` is capped by ``[worker.generation]``. The prompt and ``hypha.verify``'s are held to
``max_input_bytes`` and to the model's byte bound (:mod:`hypha_celery.models.text_inputs`).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import InvalidInput, InvalidTask, UnsupportedModel
from hypha_celery.manifest import Manifest, validate_model_id
from hypha_celery.models.store import ModelStore
from hypha_celery.models.text_inputs import TextBound, check_text, check_texts, unicode_error
from hypha_celery.resources.requirements import Requirements
from hypha_celery.stages.validation.arguments import Arg, TaskArgs, check_arguments, check_value
from hypha_celery.stages.validation.common import MODEL, REQUIREMENTS, local_manifest, requirements_for
from hypha_celery.structured.response_format import check_schema, schema_of

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GenerateParams",
    "GenerateSpec",
    "check_generate_model",
    "check_prompt_bytes",
    "check_response_format",
    "generate_args",
    "has_chat_template",
    "prompt_or_messages",
    "validate_generate",
]

DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
_ROLES = ("system", "user", "assistant")
PROMPT = Arg("prompt", "str", low=1)
MESSAGES = Arg("messages", "list", low=1, high=MAX_MESSAGES, items=Arg("", "object", fields=(
    Arg("role", choices=_ROLES, required=True), Arg("content", "str", required=True))))
PROMPT_OR_MESSAGES = (("prompt", "messages"), "prompt (a string) or messages (chat turns)")
STOP = Arg("stop", "list", high=MAX_STOP_STRINGS, items=Arg("", "str", low=1, high=MAX_STOP_CHARS))
RESPONSE_FORMAT = Arg("response_format", "object", nullable=True, fields=(
    Arg("type", choices=("text", "json_object", "json_schema"), required=True),
    Arg("json_schema", "object", fields=(
        Arg("name", "str", required=True, pattern=re.compile(r"^[A-Za-z0-9_-]{1,64}$"),
            note=" (letters, digits, _ and -; at most 64)"),
        Arg("schema", "object"),
        Arg("description", "str", high=4096),
        Arg("strict", "bool", nullable=True),
    )),
))


@dataclass(frozen=True)
class GenerateParams:
    """Sampling settings, checked; the executor hands them to transformers' ``generate``."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    proof: bool = False  # the result carries a proof of its hidden states (hypha_celery.runtimes.proofs)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass(frozen=True)
class GenerateSpec:
    model: str
    params: GenerateParams
    requirements: Requirements
    manifest: Manifest | None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    response_format: dict[str, Any] | None = None  # checked; None: plain text
    resume: bool = True  # a copy continues after the tokens an earlier run streamed (False: from the start)


def generate_args(max_new_tokens: int) -> TaskArgs:
    """``hypha.generate``'s arguments on a worker whose ``[worker.generation]`` caps ``max_new_tokens``."""
    return TaskArgs("hypha.generate", (
        MODEL, PROMPT, MESSAGES, REQUIREMENTS,
        Arg("max_new_tokens", "int", 1, max_new_tokens, default=min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens)),
        Arg("do_sample", "bool", default=False),
        Arg("temperature", "number", 0.0, 100.0, low_open=True, default=1.0),
        Arg("top_p", "number", 0.0, 1.0, low_open=True, default=1.0),
        Arg("top_k", "int", 0, 1_000_000, default=50),
        Arg("repetition_penalty", "number", 0.0, 100.0, low_open=True, default=1.0),
        Arg("seed", "int", 0, 2**63 - 1, nullable=True),
        Arg("stop", default=[]),  # a string or a list of them (STOP)
        Arg("proof", "bool", default=False),
        Arg("resume", "bool", default=True),  # a copy may continue from its token stream (stages/continuation.py)
        RESPONSE_FORMAT,
    ), one_of=(PROMPT_OR_MESSAGES,))


def validate_generate(cfg: WorkerConfig, store: ModelStore, args: Sequence[Any], kwargs: Mapping[str, Any]) -> GenerateSpec:
    values = check_arguments(generate_args(cfg.generation.max_new_tokens), args, kwargs)
    model = validate_model_id(kwargs["model"])
    requirements = requirements_for(cfg, kwargs.get("requirements"), sizable=True)
    prompt, messages = prompt_or_messages(values, cfg.security.max_input_bytes)
    params = GenerateParams(
        max_new_tokens=values["max_new_tokens"], do_sample=values["do_sample"], temperature=float(values["temperature"]),
        top_p=float(values["top_p"]), top_k=values["top_k"], repetition_penalty=float(values["repetition_penalty"]),
        seed=values["seed"], stop=_check_stop(values["stop"]), proof=values["proof"])
    response_format = check_response_format(values["response_format"])
    if response_format is not None and params.stop:
        raise InvalidTask("stop strings cannot be combined with response_format: a stop string would cut the JSON")
    manifest = local_manifest(store, model)
    if manifest is not None:
        check_generate_model(store, manifest, messages is not None)
    check_prompt_bytes(prompt, messages, manifest, cfg.security.max_text_bytes)
    return GenerateSpec(model=model, params=params, requirements=requirements, manifest=manifest, prompt=prompt,
                        messages=messages, response_format=response_format, resume=values["resume"])


def check_response_format(value: Any) -> dict[str, Any] | None:
    """The checked ``response_format`` (OpenAI's shape); None for plain text (absent, null or type ``text``).

    Refuses a wrong shape and a schema too large, too deep, invalid or using what the grammar engine does not
    implement (``InvalidTask`` naming it); ``FeatureUnavailable`` on a worker without the ``[structured]`` extra.
    """
    checked = check_value(RESPONSE_FORMAT, value)
    kind = checked["type"] if checked is not None else "text"
    if checked is not None and "json_schema" in checked and kind != "json_schema":
        raise InvalidTask(f"response_format.json_schema is only for type 'json_schema', not {kind!r}")
    if checked is None or kind == "text":
        return None
    if kind == "json_schema" and "json_schema" not in checked:
        raise InvalidTask("response_format of type 'json_schema' is missing 'json_schema' (its name and schema)")
    schema = schema_of(checked)
    assert schema is not None
    check_schema(schema)
    return checked


def prompt_or_messages(values: Mapping[str, Any], max_bytes: int) -> tuple[str | None, list[dict[str, str]] | None]:
    """The checked ``prompt`` or ``messages`` (one of them is set), as Unicode within ``max_input_bytes``."""
    if values.get("messages") is not None:
        return None, _check_messages(values["messages"], max_bytes)
    prompt: str = values["prompt"]
    if len(prompt.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidInput(f"prompt is above max_input_bytes ({max_bytes})")
    check_text(prompt, "prompt")  # Unicode scalar values only
    return prompt, None


def check_prompt_bytes(prompt: str | None, messages: list[dict[str, str]] | None, manifest: Manifest | None,
                       max_text_bytes: int | None) -> None:
    """The prompt (or the messages' contents together) within the model's byte bound, or the worker-wide one when
    the model is not read yet (``manifest`` None: checked again under the lease, once fetched)."""
    bound = TextBound.of(manifest.id if manifest else None, manifest.max_length if manifest else None, max_text_bytes)
    if prompt is not None:
        check_text(prompt, "prompt", bound)
    else:
        check_text("".join(m["content"] for m in messages or []), "messages' contents together", bound)


def _check_stop(stop: Any) -> tuple[str, ...]:
    """``stop``: one string, or a list of them (:data:`STOP`), each Unicode scalar values."""
    checked = check_value(STOP, [stop] if isinstance(stop, str) else stop)
    check_texts(checked, "stop")
    return tuple(checked)


def _check_messages(messages: list[dict[str, str]], max_bytes: int) -> list[dict[str, str]]:
    """Checked ``messages`` (:data:`MESSAGES`): each content Unicode scalar values, all within ``max_bytes``."""
    size = 0
    for index, message in enumerate(messages):
        error = unicode_error(message["content"], f"messages[{index}].content")
        if error is not None:
            raise error
        size += len(message["content"].encode("utf-8"))
    if size > max_bytes:
        raise InvalidInput(f"messages are {size} bytes, above max_input_bytes ({max_bytes})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_generate_model(store: ModelStore, manifest: Manifest, chat: bool) -> None:
    """Whether ``manifest`` is a text-generation model (with a chat template when ``messages`` were sent)."""
    model = manifest.id
    if manifest.runtime != "transformers" or manifest.task != "text-generation":
        what = manifest.task if manifest.runtime == "transformers" else f"a built-in {manifest.architecture!r} model"
        raise InvalidTask(f"model {model!r} is {what}, not a text-generation model: send it hypha.infer")
    if importlib.util.find_spec("transformers") is None:  # finds it without importing it
        raise UnsupportedModel(f"model {model!r} is a transformers model; this worker lacks the [hf] extra")
    templated = manifest
    if manifest.adapter_of is not None and store.has(manifest.adapter_of.id):  # an adapter: its base's template
        templated = store.manifest(manifest.adapter_of.id)
    if chat and not has_chat_template(store, templated):
        raise InvalidTask(f"model {model!r} has no chat template (chat_template.jinja or tokenizer_config.json's "
                          "chat_template): send a prompt, not messages")


def has_chat_template(store: ModelStore, manifest: Manifest) -> bool:
    """A chat template in the stored files: ``chat_template.jinja`` or ``tokenizer_config.json``'s key."""
    if "chat_template.jinja" in manifest.files:
        return True
    if "tokenizer_config.json" not in manifest.files:
        return False
    config = store.read_json(manifest.id, "tokenizer_config.json")
    return isinstance(config, dict) and bool(config.get("chat_template"))
