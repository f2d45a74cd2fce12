"""hypha.generate without processes: argument checks, the tiny Llama, transformers' generate behind our stop rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hypha_celery.config import parse_config
from hypha_celery.errors import ConfigError, InvalidTask
from hypha_celery.models.examples import TINY_CLASSIFIER, TINY_LLAMA, write_tiny_bert, write_tiny_llama
from hypha_celery.models.store import ModelStore
from hypha_celery.runtimes import transformers_generation, transformers_loading
from hypha_celery.runtimes.transformers_generation import visible
from hypha_celery.stages.validation import GenerateParams, GenerateSpec, validate_generate
from hypha_celery.work import Generate, Generated, Prompt, Streamed

NO_TEMPLATE = "tiny-llama-plain"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("gen-store")
    store = ModelStore(root / "store")
    for name in (TINY_LLAMA, NO_TEMPLATE, TINY_CLASSIFIER):
        folder = root / name
        folder.mkdir()
        if name == TINY_CLASSIFIER:
            write_tiny_bert(folder, classifier=True)
        else:
            write_tiny_llama(folder)
        if name == NO_TEMPLATE:
            (folder / "chat_template.jinja").unlink()
        store.add("transformers", folder, name)
    return store


@pytest.fixture(scope="module")
def llama(store: ModelStore) -> transformers_loading.TransformerModel:
    import torch

    torch.set_num_threads(1)
    return transformers_loading.load(store.open(TINY_LLAMA), "cpu")[0]


def _validate(store: ModelStore, worker: dict[str, Any] | None = None, **kwargs: Any) -> GenerateSpec:
    return validate_generate(parse_config({"worker": worker or {}}), store, (), {"model": TINY_LLAMA, **kwargs})


def _batch(model: transformers_loading.TransformerModel, prompts: list[Prompt], updates: list[Streamed] | None = None,
           **params: Any) -> list[Generated | Exception]:
    request = Generate(model=TINY_LLAMA, prompts=prompts, params=GenerateParams(**params).to_json(),
                       progress_interval=0.0)
    return transformers_generation.generate(model, request, (updates if updates is not None else []).append).outputs


def _run(model: transformers_loading.TransformerModel, prompt: str, updates: list[Streamed] | None = None,
         **params: Any) -> Generated:
    [done] = _batch(model, [Prompt(prompt=prompt)], updates, **params)
    assert isinstance(done, Generated)
    return done


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": "5"}, "max_new_tokens"),
    ({"prompt": "hi", "temperature": 0}, "temperature"),
    ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "top_k": True}, "top_k"),
    ({"prompt": "hi", "do_sample": "yes"}, "do_sample"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop": [1]}, "stop"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"messages": []}, "messages"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "exactly one of prompt"),
    ({}, "exactly one of prompt"),
    ({"prompt": "hi", "max_tokens": 5}, "unknown argument 'max_tokens'"),
])
def test_a_bad_argument_is_refused_by_name(store: ModelStore, kwargs: dict[str, Any], named: str) -> None:
    # Given a generate request with one bad argument, When it is validated
    with pytest.raises(InvalidTask) as caught:
        _validate(store, **kwargs)
    # Then the refusal names that argument
    assert named in str(caught.value)


def test_max_new_tokens_is_capped_by_the_worker_config(store: ModelStore) -> None:
    # Given a worker whose [worker.generation] max_new_tokens is 100
    worker = {"generation": {"max_new_tokens": 100}}
    # When a request asks for 100, then for 101
    allowed = _validate(store, worker, prompt="hi", max_new_tokens=100)
    # Then 100 passes and 101 is refused, naming the cap
    assert allowed.params.max_new_tokens == 100
    with pytest.raises(InvalidTask, match="max_new_tokens must be an integer from 1 to 100"):
        _validate(store, worker, prompt="hi", max_new_tokens=101)


def test_an_unknown_generation_key_gets_a_did_you_mean() -> None:
    # Given a config with a misspelt [worker.generation] key, When it is parsed
    with pytest.raises(ConfigError) as caught:
        parse_config({"worker": {"generation": {"max_new_token": 10}}})
    # Then the error names the key it meant
    assert "max_new_tokens" in str(caught.value)


def test_defaults_are_greedy_and_64_tokens(store: ModelStore) -> None:
    # Given a request with a prompt only, When it is validated
    params = _validate(store, prompt="hi").params
    # Then generation is greedy, 64 tokens, no stop strings
    assert (params.do_sample, params.max_new_tokens, params.stop, params.seed) == (False, 64, (), None)


def test_a_non_generation_model_is_refused_naming_the_task_to_use(store: ModelStore) -> None:
    # Given a text classifier, When a generation is asked of it
    with pytest.raises(InvalidTask, match=r"send it hypha\.infer"):
        validate_generate(parse_config({}), store, (), {"model": TINY_CLASSIFIER, "prompt": "hi"})


def test_messages_for_a_model_without_a_chat_template_are_refused(store: ModelStore) -> None:
    # Given a causal LM without a chat template, When chat messages are sent to it
    with pytest.raises(InvalidTask, match="no chat template"):
        validate_generate(parse_config({}), store, (), {"model": NO_TEMPLATE,
                                                        "messages": [{"role": "user", "content": "hi"}]})


def test_messages_for_a_model_with_a_chat_template_are_accepted(store: ModelStore) -> None:
    # Given the tiny Llama (chat_template.jinja), When chat messages are sent to it
    spec = _validate(store, messages=[{"role": "user", "content": "hi"}])
    # Then they pass validation as they were sent
    assert spec.messages == [{"role": "user", "content": "hi"}] and spec.prompt is None


def test_greedy_generation_equals_transformers_generate(store: ModelStore,
                                                        llama: transformers_loading.TransformerModel) -> None:
    import torch

    # Given the tiny Llama, When it generates 12 tokens greedily through our runtime and through transformers
    ours = _run(llama, "The cat sat", max_new_tokens=12)
    encoded = llama.tokenizer("The cat sat", return_tensors="pt")
    with torch.inference_mode():
        theirs = llama.module.generate(**encoded, max_new_tokens=12, do_sample=False,
                                       pad_token_id=llama.tokenizer.pad_token_id)
    new = theirs[0, encoded["input_ids"].shape[1]:]
    # Then the texts and token counts are the same
    assert ours.text == llama.tokenizer.decode(new, skip_special_tokens=True)
    assert (ours.prompt_tokens, ours.completion_tokens) == (encoded["input_ids"].shape[1], new.numel())


def test_reaching_max_new_tokens_ends_with_length(llama: transformers_loading.TransformerModel) -> None:
    # Given the tiny Llama, When it generates 8 tokens
    done = _run(llama, "The cat sat", max_new_tokens=8)
    # Then it stopped for length after 8 tokens
    assert (done.finish_reason, done.completion_tokens) == ("length", 8)


def test_a_stop_string_cuts_the_text_and_ends_with_stop(llama: transformers_loading.TransformerModel) -> None:
    # Given the text greedy generation gives, and a stop string taken from its middle
    full = _run(llama, "The cat sat", max_new_tokens=30).text
    stop = full[6:9]
    # When the same generation runs with that stop string
    done = _run(llama, "The cat sat", max_new_tokens=30, stop=[stop])
    # Then the text ends just before the stop string's first occurrence, for reason "stop", early
    assert done.text == full[:full.find(stop)]
    assert done.finish_reason == "stop" and done.completion_tokens < 30


def test_streamed_texts_are_prefixes_of_the_final_text(llama: transformers_loading.TransformerModel) -> None:
    # Given a report after every token
    updates: list[Streamed] = []
    # When the tiny Llama generates 40 tokens
    done = _run(llama, "The cat sat", updates, max_new_tokens=40)
    # Then every reported text is a prefix of the final one, and token counts grow; a last report brings the final text
    assert len(updates) == 41 and updates[-1].text == done.text
    assert all(done.text.startswith(update.text) for update in updates)
    assert [update.tokens for update in updates] == [*range(1, 41), 40]
    # And each report carries the tokens since the one before, numbered: joined, every token once
    assert [update.start for update in updates] == [*range(40), 40]
    assert [len(update.ids) for update in updates] == [1] * 40 + [0]


def test_seeded_sampling_repeats(llama: transformers_loading.TransformerModel) -> None:
    # Given a seed, When the same sampled generation runs twice
    first = _run(llama, "The cat sat", max_new_tokens=16, do_sample=True, temperature=1.5, seed=7)
    second = _run(llama, "The cat sat", max_new_tokens=16, do_sample=True, temperature=1.5, seed=7)
    # Then both give the same text
    assert first.text == second.text


def test_the_chat_template_renders_messages(llama: transformers_loading.TransformerModel) -> None:
    # Given chat messages, When the tiny Llama generates from them
    messages = [{"role": "user", "content": "Hello there"}]
    request = Generate(model=TINY_LLAMA, prompts=[Prompt(messages=messages)],
                       params=GenerateParams(max_new_tokens=4).to_json())
    [done] = transformers_generation.generate(llama, request, lambda update: None).outputs
    assert isinstance(done, Generated)
    # Then the prompt is the rendered template (bos, the user turn, the assistant header)
    rendered = llama.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n") and "Hello there" in rendered
    assert done.prompt_tokens == len(llama.tokenizer(rendered, add_special_tokens=False)["input_ids"])


BATCH_PROMPTS = ["The cat sat", "Once upon a time there was a", "A", "The dog ran to the park and"]


def test_a_batch_of_prompts_generates_what_each_generates_alone(llama: transformers_loading.TransformerModel) -> None:
    # Given prompts of different lengths (left-padded to one width in the batch)
    alone = [_run(llama, prompt, max_new_tokens=16) for prompt in BATCH_PROMPTS]
    # When they generate greedily as one batch
    together = _batch(llama, [Prompt(prompt=p) for p in BATCH_PROMPTS], max_new_tokens=16)
    # Then each row's text, token counts and finish reason equal its generation alone
    assert together == alone


def test_rows_of_a_batch_end_on_their_own_stop_strings(llama: transformers_loading.TransformerModel) -> None:
    # Given a stop string taken from the middle of the first prompt's greedy text
    full = _run(llama, BATCH_PROMPTS[0], max_new_tokens=30).text
    stop = full[6:9]
    alone = [_run(llama, prompt, max_new_tokens=30, stop=[stop]) for prompt in BATCH_PROMPTS]
    # When the batch generates with that stop string
    updates: list[Streamed] = []
    together = _batch(llama, [Prompt(prompt=p) for p in BATCH_PROMPTS], updates, max_new_tokens=30, stop=[stop])
    # Then the first row stopped early for "stop", and every row equals its generation alone
    assert together == alone
    first = together[0]
    assert isinstance(first, Generated) and first.finish_reason == "stop" and first.completion_tokens < 30
    # ... and each row's streamed texts are prefixes of its own final text
    for index, done in enumerate(together):
        assert isinstance(done, Generated)
        texts = [u.text for u in updates if u.index == index]
        assert texts and all(done.text.startswith(text) for text in texts)


def test_a_refused_prompt_fails_alone_and_the_rest_of_the_batch_runs(
        llama: transformers_loading.TransformerModel) -> None:
    from hypha_celery.errors import InvalidInput

    # Given a batch where one prompt is longer than the model's maximum length
    too_long = "word " * 400
    # When the batch generates
    done = _batch(llama, [Prompt(prompt="The cat sat"), Prompt(prompt=too_long)], max_new_tokens=8)
    # Then that prompt gets its own error and the other its text
    assert isinstance(done[1], InvalidInput) and "maximum length" in str(done[1])
    assert done[0] == _run(llama, "The cat sat", max_new_tokens=8)


@pytest.mark.parametrize(("text", "stop", "shown"), [
    ("hello wor", ["world"], "hello "),
    ("hello world!", ["world"], "hello "),
    ("caf\ufffd", [], "caf"),
    ("abc", ["x"], "abc"),
])
def test_visible_text_holds_back_what_may_change(text: str, stop: list[str], shown: str) -> None:
    # Given unfinished text, When it is shown to a client, Then only what cannot change is shown
    assert visible(text, stop) == shown


def test_the_tiny_llama_imports_as_text_generation_with_its_chat_template(tmp_path: Path) -> None:
    # Given the tiny Llama written to a folder
    write_tiny_llama(tmp_path)
    # When it is imported into a store
    manifest = ModelStore(tmp_path / "store").add("transformers", tmp_path, TINY_LLAMA).manifest
    # Then it is a Llama text-generation model with its chat template and a KV-cache estimate
    assert (manifest.task, manifest.architecture) == ("text-generation", "LlamaForCausalLM")
    assert "chat_template.jinja" in manifest.files and manifest.memory is not None
    assert manifest.memory.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


def _ids_of(updates: list[Streamed], index: int = 0) -> list[int]:
    """A row's token ids as its reports numbered them (each report carries those since the one before)."""
    ids: list[int] = []
    for update in (u for u in updates if u.index == index):
        assert update.start == len(ids) or update.start < len(ids)
        ids.extend(update.ids[len(ids) - update.start:])
    return ids


@pytest.mark.parametrize("seam", [1, 9, 23])
def test_the_static_path_continues_a_greedy_row_after_its_resumed_tokens(llama: transformers_loading.TransformerModel,
                                                                         seam: int) -> None:
    # Given a greedy generation of 24 tokens on the static path (an adapter's, a proof's, static batching's)
    updates: list[Streamed] = []
    full = _run(llama, "The cat sat on", updates, max_new_tokens=24)
    tokens = _ids_of(updates)
    assert len(tokens) == full.completion_tokens == 24
    # When it is continued after its first `seam` tokens, batched beside a fresh row
    resumed_updates: list[Streamed] = []
    resumed, fresh = _batch(llama, [Prompt(prompt="The cat sat on", resume=tokens[:seam]), Prompt(prompt="Hello")],
                            resumed_updates, max_new_tokens=24)
    # Then it ends as the uninterrupted run did, says where it continued, and reports only the tokens after the seam
    assert isinstance(resumed, Generated) and isinstance(fresh, Generated)
    assert (resumed.text, resumed.finish_reason, resumed.completion_tokens) == (full.text, "length", 24)
    assert resumed.resumed_from == seam and resumed.prompt_tokens == full.prompt_tokens
    assert min(u.start for u in resumed_updates if u.index == 0) == seam
    assert fresh.text == _run(llama, "Hello", max_new_tokens=24).text and fresh.resumed_from == 0


def test_the_static_path_starts_over_where_it_cannot_continue_exactly(
        llama: transformers_loading.TransformerModel) -> None:
    updates: list[Streamed] = []
    seeded = _run(llama, "The cat sat on", updates, max_new_tokens=12, do_sample=True, seed=3)
    tokens = _ids_of(updates)
    # A seeded sampled row (its generator state cannot be restored here) starts over: the seed replays its tokens
    [again] = _batch(llama, [Prompt(prompt="The cat sat on", resume=tokens[:5])], max_new_tokens=12, do_sample=True,
                     seed=3)
    assert isinstance(again, Generated) and again.resumed_from == 0 and again.text == seeded.text
    # And so does a row whose resumed tokens are outside the vocabulary or already all of max_new_tokens
    for resume in ([10**9], [5] * 12):
        [out] = _batch(llama, [Prompt(prompt="The cat sat on", resume=resume)], max_new_tokens=12)
        assert isinstance(out, Generated) and out.resumed_from == 0 and out.completion_tokens == 12
