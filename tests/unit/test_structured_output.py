"""Structured output (hypha_celery/structured): response_format checked, decoding constrained on both generation
paths, the output checked before SUCCESS. The tiny Llama's weights are random: only the constraint makes its
output valid JSON, so a valid corpus proves the constraint works."""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

import pytest

from bench.structured import CORPUS, PROMPT, engine, response_format, static
from hypha_celery.config import parse_config
from hypha_celery.errors import FeatureUnavailable, InvalidOutput, InvalidTask
from hypha_celery.models.examples import TINY_LLAMA
from hypha_celery.models.store import ModelStore
from hypha_celery.runtimes import transformers_loading
from hypha_celery.serving.request import Finish
from hypha_celery.stages.validation import validate_generate
from hypha_celery.stages.validation.generate import check_response_format
from hypha_celery.structured import response_format as formats
from hypha_celery.structured.grammar import Grammars
from hypha_celery.structured.response_format import MAX_SCHEMA_BYTES, check_output

JSON_OBJECT = {"type": "json_object"}


@pytest.fixture(scope="module")
def model(tiny_llama: transformers_loading.TransformerModel) -> transformers_loading.TransformerModel:
    return tiny_llama


@pytest.fixture(scope="module")
def store(tiny_llama_store: ModelStore) -> ModelStore:
    return tiny_llama_store


def _schema_valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        check_output(text, response_format("x", schema))
    except InvalidOutput:
        return False
    return True


# -- decoding: the corpus through both paths ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", [None, 7])
def test_every_schema_of_the_corpus_gives_valid_json_through_transformers_generate(model: Any, seed: int | None) -> None:
    # Given the corpus of schemas (nested objects, enums, bounded arrays and numbers, optional keys, patterns)
    formats_ = [response_format(name, schema) for name, schema in CORPUS.items()]
    # When the random-weight tiny Llama generates one batch row per schema (greedy, then sampled)
    outputs = static(model, formats_, seed)
    # Then every output validates against its schema, and each ended because its JSON was complete
    for (name, schema), output in zip(CORPUS.items(), outputs, strict=True):
        assert _schema_valid(output.text, schema), (name, output.text)
        assert output.finish_reason == "stop", (name, output.text)


@pytest.mark.parametrize("seed", [None, 7])
def test_every_schema_of_the_corpus_gives_valid_json_through_the_continuous_batching_engine(
        model: Any, seed: int | None) -> None:
    # Given the corpus, When its rows run through one engine, each with its own constraint
    handles = engine(model, [response_format(name, schema) for name, schema in CORPUS.items()], seed)
    # Then every row's text validates, and the row finished at its grammar's end (stop), not its length
    for (name, schema), handle in zip(CORPUS.items(), handles, strict=True):
        assert handle.error is None and handle.finish is Finish.STOP, (name, handle.finish, handle.error)
        assert _schema_valid(handle.text, schema), (name, handle.text)


def test_without_the_constraint_the_same_rows_are_not_valid_json(model: Any) -> None:
    # Given the same prompt and settings, When the tiny Llama generates with no response_format
    outputs = static(model, [None], None, 48)
    # Then its text is no JSON at all: the validity above is the constraint's doing
    with pytest.raises(ValueError):
        json.loads(outputs[0].text)


def test_json_object_gives_an_object_on_both_paths(model: Any) -> None:
    # Given response_format json_object, When both paths generate (greedy and sampled)
    texts = [o.text for seed in (None, 3) for o in static(model, [JSON_OBJECT], seed)]
    texts += [h.text for seed in (None, 3) for h in engine(model, [JSON_OBJECT], seed)]
    # Then each text parses as a JSON object
    for text in texts:
        assert isinstance(json.loads(text), dict), text


def test_a_constrained_row_leaves_its_unconstrained_neighbours_unchanged(model: Any) -> None:
    # Given an unconstrained greedy row alone, and the same row batched with a constrained one
    alone_static = static(model, [None], None, 24)[0].text
    alone_engine = engine(model, [None], None, 24)[0].tokens
    mixed_static = static(model, [response_format("flat", CORPUS["flat"]), None], None, 24)
    mixed_engine = engine(model, [response_format("flat", CORPUS["flat"]), None], None, 24)
    # Then the unconstrained row is what it was alone, on both paths
    assert mixed_static[1].text == alone_static
    assert mixed_engine[1].tokens == alone_engine


# -- the grammar engine missing ----------------------------------------------------------------------------------

def test_a_response_format_is_refused_by_validation_when_the_structured_extra_is_missing(
        store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a worker where llguidance cannot be found (the [structured] extra not installed)
    real = importlib.util.find_spec
    monkeypatch.setattr(formats.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llguidance" else real(name, *a))
    # When a generation asks for JSON, Then it is refused naming the extra; plain text still validates
    with pytest.raises(FeatureUnavailable, match=r"\[structured\] extra.*llguidance"):
        validate_generate(parse_config({}), store, (), {"model": TINY_LLAMA, "prompt": "hi",
                                                        "response_format": JSON_OBJECT})
    spec = validate_generate(parse_config({}), store, (), {"model": TINY_LLAMA, "prompt": "hi",
                                                           "response_format": {"type": "text"}})
    assert spec.response_format is None


def test_the_executor_refuses_a_constraint_when_llguidance_does_not_import(
        model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an executor where importing llguidance fails, When a grammar is needed
    monkeypatch.setitem(sys.modules, "llguidance", None)
    # Then a named error says which extra is missing
    with pytest.raises(FeatureUnavailable, match=r"\[structured\]"):
        Grammars(model.tokenizer, 400, [1])


# -- response_format, checked -------------------------------------------------------------------------------------

def test_text_or_absent_is_plain_text() -> None:
    assert check_response_format(None) is None
    assert check_response_format({"type": "text"}) is None


@pytest.mark.parametrize(("value", "match"), [
    ({"type": "yaml"}, r"response_format\.type must be one of 'text', 'json_object', 'json_schema'"),
    ({"type": "json_schema"}, "missing 'json_schema'"),
    ({"type": "json_object", "json_schema": {"name": "x"}}, "only for type 'json_schema'"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "missing 'name'"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, r"json_schema\.name must be"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}, "unknown setting 'extra'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "no valid JSON Schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}},
     r"does not support.*\"not\""),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     r"does not support.*uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(700)}}}},
     f"above {MAX_SCHEMA_BYTES}"),
])
def test_a_bad_response_format_is_refused_naming_what_is_wrong(value: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidTask, match=match):
        check_response_format(value)


def test_a_too_deep_schema_is_refused() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidTask, match="nests deeper"):
        check_response_format(response_format("deep", schema))


def test_every_corpus_schema_passes_validation_unchanged() -> None:
    for name, schema in CORPUS.items():
        assert check_response_format(response_format(name, schema)) == response_format(name, schema)


def test_stop_strings_with_a_response_format_are_refused(store: ModelStore) -> None:
    with pytest.raises(InvalidTask, match="stop strings cannot be combined with response_format"):
        validate_generate(parse_config({}), store, (), {"model": TINY_LLAMA, "prompt": PROMPT, "stop": "}",
                                                        "response_format": JSON_OBJECT})


def test_validation_carries_the_response_format_into_the_spec(store: ModelStore) -> None:
    fmt = response_format("flat", CORPUS["flat"])
    spec = validate_generate(parse_config({}), store, (), {"model": TINY_LLAMA, "prompt": PROMPT,
                                                           "response_format": fmt})
    assert spec.response_format == fmt


# -- the output, checked before SUCCESS ----------------------------------------------------------------------------

def test_a_valid_output_passes_and_is_returned_parsed() -> None:
    assert check_output('{"name":"a","age":3}', response_format("flat", CORPUS["flat"])) == {"name": "a", "age": 3}
    assert check_output("anything", None) is None and check_output("anything", {"type": "text"}) is None


@pytest.mark.parametrize(("text", "fmt", "finish", "match"), [
    ('{"name":"a"', response_format("flat", CORPUS["flat"]), "length", "not JSON.*ran out of max_new_tokens"),
    ('{"name":"a","age":300}', response_format("flat", CORPUS["flat"]), "stop", "at age: 300 is greater"),
    ('{"name":"a"}', response_format("flat", CORPUS["flat"]), "stop", "'age' is a required property"),
    ('{"colour":"pink","size":"S"}', response_format("enum", CORPUS["enum"]), "stop", "at colour"),
    ("[1, 2]", JSON_OBJECT, "stop", "is not of type 'object'"),
    ("hello", JSON_OBJECT, "stop", "not JSON"),
])
def test_an_output_off_its_format_is_an_invalid_output_never_success(text: str, fmt: dict[str, Any], finish: str,
                                                                     match: str) -> None:
    with pytest.raises(InvalidOutput, match=match):
        check_output(text, fmt, finish)



def test_a_constrained_row_continued_after_its_first_tokens_ends_as_the_uninterrupted_one(model: Any) -> None:
    from bench.structured import MAX_NEW_TOKENS
    from hypha_celery.runtimes.transformers_generation import constraint_for
    from hypha_celery.serving.engine import Engine
    from hypha_celery.serving.request import Request

    # Given a greedy generation constrained to the "nested" schema, run uninterrupted
    (full,) = engine(model, [response_format("nested", CORPUS["nested"])], None)
    assert full.finish is Finish.STOP and len(full.tokens) > 8
    # When another engine continues it after its first 8 tokens (mid-JSON), with a fresh constraint
    eng = Engine(model.module, model.tokenizer)
    prompt = list(model.tokenizer(PROMPT)["input_ids"])
    resumed = eng.add(Request(prompt, MAX_NEW_TOKENS, resume=tuple(full.tokens[:8]),
                              constraint=constraint_for(model, response_format("nested", CORPUS["nested"]))))
    eng.run()
    # Then the constraint took the resumed tokens as produced: the row ends with the same valid JSON
    assert resumed.finish is Finish.STOP and resumed.tokens == full.tokens and resumed.text == full.text
    assert _schema_valid(resumed.text, CORPUS["nested"])
