"""OpenAI request bodies into hypha task calls: every parameter honoured, or a 400 that names it.

Each endpoint's body is read by one function here, without I/O, so the translation is
tested alone. A parameter is either translated into ``hypha.generate``'s or
``hypha.infer``'s arguments, accepted because it changes nothing we compute (``user``,
and ``null`` or OpenAI's neutral value for anything else), or refused with a 400 naming
it: a client is never answered as if it had been honoured.

Sampling follows OpenAI's meaning: ``temperature`` 0 is greedy decoding; otherwise (its
default is 1) tokens are sampled at that temperature with ``top_p``, and no top-k
(transformers' default of 50 is turned off). ``n`` choices are ``n`` tasks; with a
``seed``, choice ``i`` samples with ``seed + i``, so the choices differ and repeat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hypha_celery.gateway.errors import ApiError, invalid, unsupported

__all__ = [
    "MAX_N", "EmbeddingsCall", "GenerateCall", "chat_request", "check_dimensions", "completion_request",
    "embeddings_request",
]

MAX_N = 8  # choices one request may ask for: each is a task
_MAX_STOP = 4  # OpenAI's limit
_SEED_LIMIT = 2**63
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Parameters that change nothing we compute at these values (null is "not given" for every parameter).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False, 0), "echo": (False,),
    "best_of": (1,), "suffix": ("",), "parallel_tool_calls": (True, False), "store": (False,),
    "logit_bias": ({},), "tools": ([],),
}
_ALWAYS_ACCEPTED = {"user", "metadata"}  # who is asking, for the caller's bookkeeping: changes no output


@dataclass(frozen=True)
class GenerateCall:
    """One chat or text completion request as ``hypha.generate`` calls: ``kwargs`` for choice 0, ``n`` choices."""

    model: str
    kwargs: dict[str, Any]
    n: int = 1
    stream: bool = False
    include_usage: bool = False

    def choice_kwargs(self, index: int) -> dict[str, Any]:
        """The kwargs of choice ``index``: a seeded sampler gets ``seed + index``."""
        kwargs = dict(self.kwargs)
        if index and "seed" in kwargs:
            kwargs["seed"] = (kwargs["seed"] + index) % _SEED_LIMIT
        return kwargs


@dataclass(frozen=True)
class EmbeddingsCall:
    """One embeddings request: the texts ``hypha.infer`` embeds, and how to encode the vectors."""

    model: str
    texts: list[str]
    encoding_format: str = "float"
    dimensions: int | None = None


def _body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return {key: value for key, value in body.items() if value is not None}


def _refuse_unknown(body: Mapping[str, Any], handled: set[str]) -> None:
    for key, value in body.items():
        if key in handled or key in _ALWAYS_ACCEPTED:
            continue
        if key in _NEUTRAL and value in _NEUTRAL[key]:
            continue
        raise unsupported(key)


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model must be a non-empty string", "model")
    return model


def _number(body: Mapping[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        bound = f"{'above' if low_open else 'from'} {low:g} {'up to' if low_open else 'to'} {high:g}"
        raise invalid(f"{name} must be a number {bound}, got {value!r}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"{name} must be an integer from {low} to {high}, got {value!r}", name)
    return value


def _response_format(body: Mapping[str, Any]) -> dict[str, Any]:
    """``hypha.generate``'s ``response_format`` argument (none for plain text); the worker checks the schema itself
    (its size, depth and what the grammar engine implements) and its refusal comes back as a 400."""
    fmt = body.get("response_format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise invalid('response_format must be an object with a "type"', "response_format")
    if fmt["type"] not in ("text", "json_object", "json_schema"):
        raise invalid(f"response_format.type must be text, json_object or json_schema; got {fmt['type']!r}",
                      "response_format")
    return {} if fmt["type"] == "text" else {"response_format": fmt}


def _sampling(body: Mapping[str, Any], max_tokens_names: tuple[str, ...], default_max: int | None) -> dict[str, Any]:
    """``hypha.generate``'s length, sampling, stop and seed arguments from OpenAI's."""
    kwargs: dict[str, Any] = {}
    given = {name: _integer(body, name, 1, 2**31 - 1) for name in max_tokens_names if name in body}
    if len(set(given.values())) > 1:
        raise invalid(f"{' and '.join(given)} disagree; give one", max_tokens_names[-1])
    max_tokens = next(iter(given.values()), default_max)
    if max_tokens is not None:
        kwargs["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    if temperature == 0.0:
        kwargs["do_sample"] = False  # greedy: top_p has nothing to choose among
    else:
        kwargs.update(do_sample=True, temperature=1.0 if temperature is None else temperature, top_k=0,
                      top_p=1.0 if top_p is None else top_p)
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not -_SEED_LIMIT <= seed < _SEED_LIMIT:
            raise invalid(f"seed must be a 64-bit integer, got {seed!r}", "seed")
        kwargs["seed"] = seed % _SEED_LIMIT
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > _MAX_STOP or not all(isinstance(s, str) and s for s in stops):
            raise invalid(f"stop must be a non-empty string or a list of at most {_MAX_STOP} of them", "stop")
        if stops:
            kwargs["stop"] = stops
    return kwargs


def _streaming(body: Mapping[str, Any], n: int) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options needs stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise unsupported("stream_options", "only include_usage is")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise invalid("stream_options.include_usage must be true or false", "stream_options")
    if stream and n > 1:
        raise unsupported("n", "a stream carries one choice")
    return stream, include_usage


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(f"messages[{index}].content", "only text parts are")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"messages[{index}].content must be a string or a list of text parts", f"messages[{index}].content")


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{index}] must be an object", f"messages[{index}]")
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise unsupported(f"messages[{index}].role", f"{role!r}; roles are system, developer, user, assistant")
        for key, value in message.items():
            if key not in ("role", "content") and value is not None:
                raise unsupported(f"messages[{index}].{key}")
        turns.append({"role": _CHAT_ROLES[role], "content": _content(message, index)})
    return turns


def _n(body: Mapping[str, Any]) -> int:
    n = _integer(body, "n", 1, MAX_N)
    return 1 if n is None else n


def chat_request(body: Any) -> GenerateCall:
    """``POST /v1/chat/completions``'s body as a ``hypha.generate`` call (``messages`` through the chat template)."""
    data = _body(body)
    _refuse_unknown(data, {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                           "seed", "n", "stream", "stream_options", "response_format"})
    model = _model(data)
    structured = _response_format(data)
    n = _n(data)
    stream, include_usage = _streaming(data, n)
    kwargs = {"model": model, "messages": _messages(data),
              **_sampling(data, ("max_tokens", "max_completion_tokens"), None), **structured}
    return GenerateCall(model=model, kwargs=kwargs, n=n, stream=stream, include_usage=include_usage)


def completion_request(body: Any) -> GenerateCall:
    """``POST /v1/completions``'s body as a ``hypha.generate`` call on a ``prompt`` (OpenAI's default of 16 tokens)."""
    data = _body(body)
    _refuse_unknown(data, {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
                           "stream_options"})
    model = _model(data)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise unsupported("prompt", "one prompt a request, as a string")
    if not isinstance(prompt, str) or not prompt:
        raise invalid("prompt must be a non-empty string", "prompt")
    n = _n(data)
    stream, include_usage = _streaming(data, n)
    kwargs = {"model": model, "prompt": prompt, **_sampling(data, ("max_tokens",), 16)}
    return GenerateCall(model=model, kwargs=kwargs, n=n, stream=stream, include_usage=include_usage)


def embeddings_request(body: Any) -> EmbeddingsCall:
    """``POST /v1/embeddings``'s body as the texts for ``hypha.infer`` (``input`` a string or a list of strings)."""
    data = _body(body)
    _refuse_unknown(data, {"model", "input", "encoding_format", "dimensions"})
    model = _model(data)
    given = data.get("input")
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not texts:
        raise invalid("input must be a string or a non-empty list of strings", "input")
    if not all(isinstance(text, str) for text in texts):
        raise unsupported("input", "token arrays are not; send strings")
    if not all(texts):
        raise invalid("input must not hold an empty string", "input")
    fmt = data.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise invalid(f"encoding_format must be float or base64, got {fmt!r}", "encoding_format")
    dimensions = _integer(data, "dimensions", 1, 1 << 16)
    return EmbeddingsCall(model=model, texts=texts, encoding_format=fmt, dimensions=dimensions)


def check_dimensions(call: EmbeddingsCall, dim: int) -> None:
    """A ``dimensions`` other than the model's own is a 400: we do not truncate embeddings."""
    if call.dimensions is not None and call.dimensions != dim:
        raise ApiError(400, f"dimensions: model {call.model!r} embeds in {dim} dimensions, not {call.dimensions}",
                       param="dimensions", code="unsupported_parameter")
