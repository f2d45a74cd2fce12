"""Text inputs without processes: Unicode scalar values only, a byte bound per model, checked before a tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from hypha_celery.config import parse_config
from hypha_celery.errors import ConfigError, InvalidInput, contained
from hypha_celery.models.examples import TINY_CLASSIFIER, TINY_LLAMA, write_tiny_bert, write_tiny_llama
from hypha_celery.models.store import ModelStore
from hypha_celery.models.text_inputs import BYTES_PER_TOKEN, SLACK_BYTES, UNKNOWN_LENGTH_BYTES, text_byte_limit
from hypha_celery.runtimes import transformers_generation, transformers_loading
from hypha_celery.stages.validation import GenerateParams, validate_generate, validate_infer, validate_train
from hypha_celery.work import Generate, Generated, Prompt

LONE = "\ud800"  # what JSON's "\ud800" decodes to: a lone surrogate, no Unicode scalar value


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("text-store")
    store = ModelStore(root / "store")
    for name in (TINY_LLAMA, TINY_CLASSIFIER):
        folder = root / name
        folder.mkdir()
        if name == TINY_CLASSIFIER:
            write_tiny_bert(folder, classifier=True)
        else:
            write_tiny_llama(folder)
        store.add("transformers", folder, name)
    return store


@pytest.fixture(scope="module")
def llama(store: ModelStore) -> transformers_loading.TransformerModel:
    import torch

    torch.set_num_threads(1)
    return transformers_loading.load(store.open(TINY_LLAMA), "cpu")[0]


def _limit(store: ModelStore, model: str) -> int:
    return text_byte_limit(store.manifest(model).max_length)


def _generate(store: ModelStore, worker: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    return validate_generate(parse_config({"worker": worker or {}}), store, (), {"model": TINY_LLAMA, **kwargs})


def _infer(store: ModelStore, texts: list[str]) -> Any:
    return validate_infer(parse_config({}), store, (), {"model": TINY_CLASSIFIER, "texts": texts})


def _train(store: ModelStore, texts: list[str]) -> Any:
    return validate_train(parse_config({}), store, (), {"model": TINY_LLAMA, "data": {"texts": texts}}, "task-1")


def test_the_bound_is_sixteen_bytes_a_token_of_the_models_length_plus_slack() -> None:
    # Given models of 256 tokens and of unknown length, When their bounds are read
    # Then 256 x 16 + 4096 bytes, the fallback for the unknown one, and a worker's figure replaces both
    assert text_byte_limit(256) == 256 * BYTES_PER_TOKEN + SLACK_BYTES == 8192
    assert text_byte_limit(None) == UNKNOWN_LENGTH_BYTES
    assert text_byte_limit(256, 1000) == text_byte_limit(None, 1000) == 1000


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"prompt": "abc" + LONE + "def"}, "prompt is not valid Unicode: character 3"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x" + LONE}]},
     "messages[1].content is not valid Unicode: character 1"),
    ({"prompt": "hi", "stop": ["ok", LONE]}, "stop[1] is not valid Unicode: character 0"),
])
def test_a_lone_surrogate_in_a_generation_is_refused_naming_argument_and_position(
        store: ModelStore, kwargs: dict[str, Any], named: str) -> None:
    # Given a generation whose text holds a lone surrogate, When validated, Then InvalidInput names where it is
    with pytest.raises(InvalidInput, match=r"U\+D800") as caught:
        _generate(store, **kwargs)
    assert named in str(caught.value)


def test_a_lone_surrogate_in_texts_to_classify_is_refused_naming_its_index(store: ModelStore) -> None:
    # Given texts to classify, the second holding a lone surrogate, When validated, Then InvalidInput names it
    with pytest.raises(InvalidInput, match=r"texts\[1\] is not valid Unicode: character 2"):
        _infer(store, ["fine", "ok" + LONE])


def test_a_lone_surrogate_in_training_texts_is_refused_naming_its_index(store: ModelStore) -> None:
    # Given inline training texts, the third holding a lone surrogate, When validated, Then InvalidInput names it
    with pytest.raises(InvalidInput, match=r"data\.texts\[2\] is not valid Unicode: character 0"):
        _train(store, ["one", "two", LONE + "three"])


def test_a_prompt_over_the_models_bound_is_refused_naming_the_bound(store: ModelStore) -> None:
    # Given the tiny Llama (256 tokens: 8192 bytes), When a prompt one byte over is validated
    limit = _limit(store, TINY_LLAMA)
    with pytest.raises(InvalidInput, match=f"prompt is {limit + 1} bytes, above the {limit} bytes") as caught:
        _generate(store, prompt="é" * ((limit + 1) // 2) + "x" * ((limit + 1) % 2))
    # Then the refusal says where the bound comes from; a prompt of exactly the bound passes
    assert "reads at most 256 tokens" in str(caught.value)
    assert _generate(store, prompt="x" * limit).prompt == "x" * limit


def test_messages_are_bounded_together(store: ModelStore) -> None:
    # Given two messages each under the bound but over it together, When validated, Then InvalidInput
    half = _limit(store, TINY_LLAMA) // 2 + 1
    with pytest.raises(InvalidInput, match="messages' contents together"):
        _generate(store, messages=[{"role": "user", "content": "x" * half}, {"role": "user", "content": "y" * half}])


def test_the_worker_setting_replaces_the_models_bound(store: ModelStore) -> None:
    # Given a worker that bounds texts at 100 bytes, When a 101-byte prompt is validated, Then it is refused by that key
    with pytest.raises(InvalidInput, match=r"max_text_bytes"):
        _generate(store, {"security": {"max_text_bytes": "100B"}}, prompt="x" * 101)
    # ... and a worker with a larger bound accepts a prompt the model's own bound refuses
    big = "x" * (_limit(store, TINY_LLAMA) + 10)
    assert _generate(store, {"security": {"max_text_bytes": "1MiB"}}, prompt=big).prompt == big


def test_texts_to_classify_and_training_texts_are_bounded_by_the_model(store: ModelStore) -> None:
    # Given a text over the classifier's bound (64 tokens) and one over the Llama's (256 tokens)
    # When validated for hypha.infer and hypha.train, Then each is refused naming its index
    with pytest.raises(InvalidInput, match=r"texts\[1\] is \d+ bytes, above the 5120 bytes"):
        _infer(store, ["short", "x" * (_limit(store, TINY_CLASSIFIER) + 1)])
    with pytest.raises(InvalidInput, match=r"data\.texts\[0\] is \d+ bytes, above the 8192 bytes"):
        _train(store, ["x" * (_limit(store, TINY_LLAMA) + 1)])


def test_max_text_bytes_is_auto_by_default_and_a_bad_value_names_the_key() -> None:
    # Given configs without the key, with "auto" and with a size, Then None (auto) or the bytes
    assert parse_config({}).security.max_text_bytes is None
    assert parse_config({"worker": {"security": {"max_text_bytes": "auto"}}}).security.max_text_bytes is None
    assert parse_config({"worker": {"security": {"max_text_bytes": "64KiB"}}}).security.max_text_bytes == 65536
    # When the value is neither, Then the config error names the key
    with pytest.raises(ConfigError, match=r"worker\.security\.max_text_bytes: .*\(or \"auto\"\)"):
        parse_config({"worker": {"security": {"max_text_bytes": "lots"}}})


def test_the_executor_refuses_a_prompt_over_the_bound_before_its_tokenizer_runs(
        llama: transformers_loading.TransformerModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the loaded tiny Llama whose tokenizer records what it is handed
    seen: list[Any] = []
    tokenizer = llama.tokenizer
    monkeypatch.setattr(llama, "tokenizer", _Recording(tokenizer, seen))
    # When a batch holds a prompt over the bound, one with a lone surrogate, and a fine one
    outputs = _batch(llama, [Prompt(prompt="x" * (text_byte_limit(256) + 1)), Prompt(prompt=LONE), Prompt(prompt="hi")])
    # Then the first two are refused by name, the third generates, and the tokenizer only ever saw "hi"
    assert isinstance(outputs[0], InvalidInput) and "above the 8192 bytes" in str(outputs[0])
    assert isinstance(outputs[1], InvalidInput) and "not valid Unicode" in str(outputs[1])
    assert isinstance(outputs[2], Generated)
    assert seen == ["hi"]


def test_a_panic_in_the_tokenizer_fails_its_prompt_alone(
        llama: transformers_loading.TransformerModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a tokenizer that panics (as pyo3 raises a Rust panic: a BaseException, not an Exception) on one prompt
    monkeypatch.setattr(llama, "tokenizer", _Recording(llama.tokenizer, [], panic_on="boom"))
    # When it is batched with a fine prompt
    outputs = _batch(llama, [Prompt(prompt="boom"), Prompt(prompt="fine")])
    # Then the panicking prompt fails with the panic named, and the other generates
    assert isinstance(outputs[0], RuntimeError) and "PanicException" in str(outputs[0])
    assert isinstance(outputs[1], Generated)


def test_a_stored_data_sets_text_is_checked_in_the_executor_before_the_tokenizer(
        llama: transformers_loading.TransformerModel) -> None:
    from hypha_celery.training.finetune.data import examples

    # Given a data set's texts as the executor reads them from data.json (validation never saw them)
    # When one is over the model's bound, or holds a lone surrogate, Then it is refused by name and index
    with pytest.raises(InvalidInput, match=r"data\.texts\[1\] is 8193 bytes, above the 8192 bytes"):
        examples(llama, {"texts": ["fine", "x" * 8193]})
    with pytest.raises(InvalidInput, match=r"data\.texts\[0\] is not valid Unicode"):
        examples(llama, {"texts": [LONE]})


def test_contained_takes_exceptions_and_panics_but_not_exits() -> None:
    # Given the failures a request may raise, Then ordinary ones and pyo3 panics are contained, exits are not
    assert contained(ValueError("x")) and contained(PanicException("x"))
    assert not contained(SystemExit(1)) and not contained(KeyboardInterrupt())


class PanicException(BaseException):  # pyo3's name, which contained() recognises
    """Stands in for ``pyo3_runtime.PanicException``, which pyo3 only creates once a panic happens."""


class _Recording:
    """A tokenizer that records the plain texts it is called with (and panics on ``panic_on``)."""

    def __init__(self, inner: Any, seen: list[Any], panic_on: str | None = None) -> None:
        self._inner, self._seen, self._panic_on = inner, seen, panic_on

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        if text == self._panic_on:
            raise PanicException("tokenizer panicked")
        self._seen.append(text)
        return self._inner(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _batch(model: transformers_loading.TransformerModel, prompts: list[Prompt]) -> list[Generated | Exception]:
    request = Generate(model=TINY_LLAMA, prompts=prompts, params=GenerateParams(max_new_tokens=2).to_json(),
                       progress_interval=60.0)
    return transformers_generation.generate(model, request, lambda _: None).outputs
