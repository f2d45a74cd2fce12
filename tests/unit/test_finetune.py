"""hypha.train on transformers models without processes: argument checks, sizing, LoRA in process, adapter entries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.config import parse_config
from hypha_celery.errors import InvalidInput, InvalidTask, UnsupportedModel
from hypha_celery.formats.registry import read_manifest
from hypha_celery.manifest import ADAPTER_FILES
from hypha_celery.models.examples import TINY_CLASSIFIER, TINY_LLAMA, init_examples, write_tiny_llama
from hypha_celery.models.store import ModelStore
from hypha_celery.stages.sizing import Training, estimate, lora_trainable_bound
from hypha_celery.stages.validation import TrainSpec, validate_train
from hypha_celery.work import Progress, Train

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a bird sang in the tree", "the sun rose over the hill"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("ft-store")
    init_examples(root)
    return ModelStore(root)


def _validate(store: ModelStore, **kwargs: Any) -> TrainSpec:
    return validate_train(parse_config({"worker": {}}), store, (), kwargs, "task-0123456789ab")


# --- argument validation ---------------------------------------------------------------------------


def test_a_causal_lm_takes_texts_with_transformers_defaults(store: ModelStore) -> None:
    # Given texts for the tiny Llama and no other argument
    spec = _validate(store, model=TINY_LLAMA, data={"texts": TEXTS})
    # Then it is a full fine-tune with the transformers defaults, max_length capped by the model's own
    assert spec.finetune is not None and spec.finetune.method == "full"
    assert (spec.epochs, spec.batch_size, spec.lr) == (1, 8, 5e-5)
    assert spec.finetune.max_length == store.manifest(TINY_LLAMA).max_length


def test_checkpoint_every_is_carried_to_the_executor(store: ModelStore) -> None:
    # Given a LoRA run that asks for a checkpoint every 50 steps, and one that asks for none
    spec = _validate(store, model=TINY_LLAMA, data={"texts": TEXTS}, method="lora", max_steps=100, checkpoint_every=50)
    plain = _validate(store, model=TINY_LLAMA, data={"texts": TEXTS})
    # Then the executor's Train carries it (the task passes finetune.to_json() on), and none by default
    assert spec.finetune is not None and spec.finetune.checkpoint_every == 50
    job = Train(model=TINY_LLAMA, new_model="x", epochs=1, lr=1e-3, batch_size=8, **spec.finetune.to_json())
    assert Train.from_json(json.loads(json.dumps(job.to_json()))).checkpoint_every == 50
    assert plain.finetune is not None and plain.finetune.checkpoint_every is None


def test_lora_settings_are_checked_and_defaulted(store: ModelStore) -> None:
    # Given a LoRA run that sets r only
    spec = _validate(store, model=TINY_LLAMA, data={"texts": TEXTS}, method="lora", lora={"r": 4}, max_steps=5)
    # Then alpha defaults to 2r, dropout to 0, and the learning rate to LoRA's default
    assert spec.finetune is not None and spec.finetune.lora == {"r": 4, "alpha": 8, "dropout": 0.0}
    assert spec.lr == 1e-3 and spec.finetune.max_steps == 5


def test_a_lora_run_given_no_length_takes_at_least_20_steps(store: ModelStore) -> None:
    # Given LoRA runs on 4 texts with no epochs and no max_steps, one with epochs, and one on 200 texts
    short = _validate(store, model=TINY_LLAMA, data={"texts": TEXTS}, method="lora")
    given = _validate(store, model=TINY_LLAMA, data={"texts": TEXTS}, method="lora", epochs=1)
    long = _validate(store, model=TINY_LLAMA, data={"texts": TEXTS * 50}, method="lora", batch_size=2)
    # Then the short one repeats its texts for 20 steps, the one with epochs keeps them, the long one takes one epoch
    assert short.finetune is not None and short.finetune.max_steps == 20
    assert given.finetune is not None and given.finetune.max_steps is None
    assert long.finetune is not None and long.finetune.max_steps == 100


@pytest.mark.parametrize(("kwargs", "error", "names"), [
    ({"method": "qlora"}, InvalidTask, "method must be"),
    ({"method": "lora", "lora": {"r": 0}}, InvalidTask, "r must be an integer"),
    ({"method": "lora", "lora": {"alpha": -1}}, InvalidTask, "lora.alpha"),
    ({"method": "lora", "lora": {"dropout": 1.0}}, InvalidTask, "lora.dropout"),
    ({"method": "lora", "lora": {"target_modules": ["q_proj", "../x"]}}, InvalidTask, "lora.target_modules"),
    ({"method": "lora", "lora": {"rank": 4}}, InvalidTask, "unknown setting 'rank'"),
    ({"lora": {"r": 4}}, InvalidTask, "lora applies to method 'lora'"),
    ({"merge": True}, InvalidTask, "merge applies to method 'lora'"),
    ({"max_steps": 0}, InvalidTask, "max_steps must be"),
    ({"max_steps": 3, "epochs": 2}, InvalidTask, "epochs or max_steps"),
    ({"grad_accum": 0}, InvalidTask, "grad_accum must be"),
    ({"warmup_steps": -1}, InvalidTask, "warmup_steps must be"),
    ({"seed": "1"}, InvalidTask, "seed must be"),
    ({"max_length": 100_000}, InvalidTask, "max_length must be"),
    ({"batch_size": 0}, InvalidTask, "batch_size must be"),
    ({"checkpoint_every": 0}, InvalidTask, "checkpoint_every must be an integer from 1"),
    ({"checkpoint_every": "50"}, InvalidTask, "checkpoint_every must be"),
    ({"checkpoint_every": 2.5}, InvalidTask, "checkpoint_every must be"),
    ({"checkpoint_every": True}, InvalidTask, "checkpoint_every must be"),
    ({"lr": 0}, InvalidTask, "lr must be"),
    ({"data": {"texts": []}}, InvalidInput, "data.texts"),
    ({"data": {"texts": ["a"], "labels": [0]}}, InvalidTask, "causal LM"),
    ({"data": {"inputs": [[1.0]], "targets": [0]}}, InvalidTask, "takes texts"),
])
def test_each_bad_argument_is_refused_by_name(store: ModelStore, kwargs: dict[str, Any], error: type[Exception],
                                              names: str) -> None:
    # Given one bad argument on an otherwise valid causal-LM task
    task = {"model": TINY_LLAMA, "data": {"texts": TEXTS}, **kwargs}
    # Then validation refuses it, naming the argument
    with pytest.raises(error, match=names.replace("(", r"\(").replace("[", r"\[")) as caught:
        _validate(store, **task)
    # with that very error type (an argument's is InvalidTask, an input's InvalidInput), not a subclass of it
    assert type(caught.value) is error


def test_classifier_labels_are_names_or_ids(store: ModelStore) -> None:
    # Given the tiny classifier (labels negative, positive)
    ok = _validate(store, model=TINY_CLASSIFIER, data={"texts": ["a", "b"], "labels": ["positive", 0]})
    assert ok.finetune is not None
    # Then an unknown name, an out-of-range id and missing labels are refused
    with pytest.raises(InvalidInput, match=r"data.labels\[1\] is 'neutral'"):
        _validate(store, model=TINY_CLASSIFIER, data={"texts": ["a", "b"], "labels": [1, "neutral"]})
    with pytest.raises(InvalidInput, match=r"data.labels\[0\] is 2"):
        _validate(store, model=TINY_CLASSIFIER, data={"texts": ["a"], "labels": [2]})
    with pytest.raises(InvalidInput, match="one label per text"):
        _validate(store, model=TINY_CLASSIFIER, data={"texts": ["a"]})


def test_built_in_models_refuse_transformers_arguments(store: ModelStore) -> None:
    rows = {"inputs": [[5.0, 3.4, 1.5, 0.2]], "targets": [0]}
    with pytest.raises(InvalidTask, match="method applies to transformers models"):
        _validate(store, model="mlp", data=rows, method="lora")
    with pytest.raises(InvalidTask, match="checkpoint_every applies to transformers models"):
        _validate(store, model="mlp", data=rows, checkpoint_every=5)
    with pytest.raises(InvalidTask, match="built-in model: data takes inputs"):
        _validate(store, model="mlp", data={"texts": TEXTS})
    # And a built-in model's task keeps its defaults
    spec = _validate(store, model="mlp", data=rows)
    assert spec.finetune is None and (spec.epochs, spec.batch_size, spec.lr) == (10, 32, 1e-3)


def test_an_embedding_model_is_not_trainable(store: ModelStore) -> None:
    with pytest.raises(InvalidTask, match="fine-tunes text-generation and text-classification"):
        _validate(store, model="tiny-bert-embedder", data={"texts": TEXTS})


# --- sizing --------------------------------------------------------------------------------------


def test_lora_sizing_counts_only_trainable_state(store: ModelStore) -> None:
    # Given the tiny Llama's config and a LoRA of rank 4 on two projections
    manifest = store.manifest(TINY_LLAMA)
    config = json.loads((store.path(TINY_LLAMA) / "config.json").read_text())
    bound = lora_trainable_bound(config, 4, 2)
    assert bound is not None and 0 < bound < manifest.memory.parameters // 10  # type: ignore[union-attr]
    # When training is sized full and LoRA, without activations
    full = estimate(manifest, gpu=False, cached=False, training=Training(activation_bytes_per_token=1))
    lora = estimate(manifest, gpu=False, cached=False, training=Training(trainable=bound, activation_bytes_per_token=1))
    weights = manifest.weights_bytes_at("float32")
    # Then full counts 4 x the weights, LoRA the weights once plus 4 x the trainable parameters' float32 bytes
    assert full.host - lora.host == 3 * weights - 4 * bound * 4
    # And activations grow with the tokens of a micro-batch
    more = estimate(manifest, gpu=False, cached=False, training=Training(trainable=bound, tokens=512,
                                                                         activation_bytes_per_token=1000))
    assert more.host - lora.host == 512 * 1000


# --- LoRA in process, and the adapter entry ------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(store: ModelStore) -> tuple[Any, list[Progress]]:
    import torch

    from hypha_celery.training.finetune.run import finetune

    torch.set_num_threads(1)
    updates: list[Progress] = []
    request = Train(model=TINY_LLAMA, new_model="unused", epochs=1, lr=1e-2, batch_size=4, method="lora",
                    lora={"r": 4, "alpha": 8, "dropout": 0.0}, max_steps=12, progress_interval=0.0)
    return finetune(store, request, {"texts": TEXTS}, "cpu", updates.append), updates


def test_lora_on_the_tiny_causal_lm_lowers_the_loss(lora_run: tuple[Any, list[Progress]]) -> None:
    done, updates = lora_run
    curve = done.trained.loss_curve
    # Then the loss fell, only the adapter trained, and progress counted every step up to 100%
    assert len(curve) == 12 and curve[-1] < curve[0] * 0.9
    assert done.trained.trained_tokens > 0
    assert done.trained.metrics["trainable_parameters"] < 10_000
    assert [u.step for u in updates[:-1]] == list(range(1, 13)) and updates[-1].percent == 100.0
    assert all(u.tokens_per_s is not None and u.tokens_per_s > 0 for u in updates)
    assert updates[-1].eta_s == 0.0


def test_the_adapter_entry_holds_only_adapter_files_and_names_its_base(store: ModelStore, lora_run: Any,
                                                                       tmp_path: Path) -> None:
    from hypha_celery.training.finetune.save import save

    done, _ = lora_run
    # When the adapter is saved and stored
    out = tmp_path / "out"
    out.mkdir()
    assert save(done, out, merge=False) == "adapter"
    record = {"task_id": "task-0123456789ab", "trained": done.trained.to_json()}
    manifest = store.add("transformers", out, "tiny-llama-lora", base=TINY_LLAMA, produced_by=record).manifest
    # Then the entry lists exactly peft's two files, and names the base by id and manifest sha256
    assert set(manifest.files) == ADAPTER_FILES
    assert sorted(p.name for p in store.path("tiny-llama-lora").iterdir() if not p.name.startswith(".")) == \
        sorted([*ADAPTER_FILES, "manifest.json"])
    stored = store.manifest("tiny-llama-lora")
    assert stored.adapter_of is not None
    assert (stored.adapter_of.id, stored.adapter_of.sha256) == (TINY_LLAMA, store.manifest_sha256(TINY_LLAMA))
    assert stored.task == "text-generation" and stored.memory is not None and stored.memory.parameters < 10_000
    # And a copy of the task that saved it answers from the record instead of training again
    copy = _validate(store, model=TINY_LLAMA, data={"texts": TEXTS}, method="lora", new_model="tiny-llama-lora")
    assert copy.finished is not None and copy.finished.trained_tokens == done.trained.trained_tokens
    # And training it is refused by name (train its base)
    with pytest.raises(InvalidTask, match="LoRA adapter"):
        _validate(store, model="tiny-llama-lora", data={"texts": TEXTS})


def test_an_import_still_refuses_adapter_files(store: ModelStore, tmp_path: Path) -> None:
    # Given a model folder that also carries an adapter
    folder = tmp_path / "with-adapter"
    folder.mkdir()
    write_tiny_llama(folder)
    (folder / "adapter_config.json").write_text("{}")
    # Then the import refuses it as an adapter presented as a full model
    with pytest.raises(UnsupportedModel, match="LoRA/PEFT adapter"):
        store.add("transformers", folder, "never")


def test_an_adapter_manifest_is_checked_field_by_field(store: ModelStore) -> None:
    data = json.loads((store.path(TINY_LLAMA) / "manifest.json").read_text())
    data["id"] = "x"
    # A model's manifest listing adapter files, and an adapter's listing model files, are refused
    with pytest.raises(UnsupportedModel, match="invalid adapter_of"):
        read_manifest({**data, "adapter_of": {"id": "../up", "sha256": "0" * 64}}, "x")
    with pytest.raises(UnsupportedModel, match="invalid file name"):
        read_manifest({**data, "adapter_of": {"id": TINY_LLAMA, "sha256": "0" * 64}}, "x")
    assert "adapter_of" not in read_manifest(data, "x").to_json()  # a model's manifest has no such key


def test_a_text_data_set_is_stored_and_read_for_training(store: ModelStore) -> None:
    from hypha_celery.executor.child import _training_data

    # Given a classifier data set stored by reference
    store.save_texts("sentiment", ["good", "bad"], ["positive", "negative"])
    spec = _validate(store, model=TINY_CLASSIFIER, data={"ref": "sentiment"})
    assert spec.finetune is not None and spec.data == {"ref": "sentiment"}
    # Then the executor reads texts and labels from it, and a rows-only data set is refused for a transformers model
    _, path = store.dataset("sentiment")
    request = Train(model=TINY_CLASSIFIER, new_model="n", epochs=1, lr=1e-3, batch_size=2, data_path=str(path))
    assert _training_data(request, texts=True) == {"texts": ["good", "bad"], "labels": ["positive", "negative"]}
    store.save_dataset("rows", [[1.0]], [0])
    rows = Train(model=TINY_CLASSIFIER, new_model="n", epochs=1, lr=1e-3, batch_size=2,
                 data_path=str(store.dataset("rows")[1]))
    with pytest.raises(InvalidInput, match="'texts'"):
        _training_data(rows, texts=True)


def test_a_model_still_at_a_source_is_validated_from_its_manifest(store: ModelStore, tmp_path: Path) -> None:
    from hypha_celery.stages.validation import finetune_params
    from hypha_celery.training.job import _finetune_kwargs

    # Given a worker whose store lacks the tiny Llama, with the shared store as its source
    config = parse_config({"worker": {"models": {"sources": [{"type": "local", "path": str(store.root)}]}}})
    remote = ModelStore(tmp_path / "empty", config.models.sources)
    # When a LoRA task on it is validated
    spec = validate_train(config, remote, (), {"model": TINY_LLAMA, "data": {"texts": TEXTS}, "method": "lora",
                                               "max_length": 4096 // 2, "max_steps": 2}, "task-1")
    # Then the source's manifest decided it (a transformers model, max_length capped by the model's), nothing fetched
    assert spec.manifest is None and not remote.has(TINY_LLAMA)
    assert spec.finetune is not None and spec.finetune.max_length == store.manifest(TINY_LLAMA).max_length
    # And the checked arguments check again, unchanged, on the fetched manifest
    assert finetune_params(_finetune_kwargs(TINY_LLAMA, spec.finetune), remote.manifest(TINY_LLAMA)) == spec.finetune


# --- adapters served from one cached base ----------------------------------------------------------


class _Replies:
    """The executor's channel, kept in memory: what it would have written to the worker."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def write(self, message: Any) -> None:
        self.sent.append(message)


def _adapter(store: ModelStore, name: str, seed: int, tmp_path: Path) -> None:
    from hypha_celery.training.finetune.run import finetune
    from hypha_celery.training.finetune.save import save

    request = Train(model=TINY_LLAMA, new_model=name, epochs=1, lr=2e-2, batch_size=4, method="lora",
                    lora={"r": 4, "alpha": 8}, max_steps=4, seed=seed, progress_interval=60.0)
    done = finetune(store, request, {"texts": TEXTS}, "cpu", lambda update: None)
    out = tmp_path / name
    out.mkdir()
    save(done, out, merge=False)
    store.add("transformers", out, name, base=TINY_LLAMA)


def test_two_adapters_share_one_cached_base_and_change_its_output(store: ModelStore, tmp_path: Path) -> None:
    from hypha_celery.executor.child import Executor
    from hypha_celery.protocol import ChildSettings
    from hypha_celery.stages.validation import GenerateParams
    from hypha_celery.work import Generate, Prompt

    # Given two adapters of the tiny Llama, and an executor with an empty cache
    for name, seed in (("lora-a", 1), ("lora-b", 2)):
        if not store.has(name):
            _adapter(store, name, seed, tmp_path)
    settings = ChildSettings(store=str(store.root), cache_size=1 << 30, max_model_size=1 << 30, device="cpu",
                             sandbox=False, nice=0, memory_mode="off", tmpdir=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    executor = Executor(settings, _Replies())  # type: ignore[arg-type]

    def text(model: str) -> str:
        request = Generate(model=model, params=GenerateParams(max_new_tokens=12).to_json(),
                           prompts=[Prompt(prompt="the cat sat")], progress_interval=60.0)
        result = executor.generate(request)
        assert result.outputs[0] is not None, result.errors
        return result.outputs[0].text

    # When the base and each adapter generate, then the base again
    base = text(TINY_LLAMA)
    first, second = text("lora-a"), text("lora-b")
    again = text(TINY_LLAMA)
    # Then the adapters change the output, the base is unchanged by them, and each adapter is repeatable
    assert first != base and second != base and again == base
    assert text("lora-a") == first
    # And the cache holds the base once plus each adapter's own (small) bytes
    sizes = executor.cache.sizes()
    assert set(sizes) == {TINY_LLAMA, "lora-a", "lora-b"}
    assert all(sizes[name] < sizes[TINY_LLAMA] // 10 for name in ("lora-a", "lora-b"))
    # And making room evicts the adapters before the base they hang on, then the base
    with executor.cache._lock:
        executor.cache._make_room(executor.cache.capacity - sizes[TINY_LLAMA])
    assert set(executor.cache.sizes()) == {TINY_LLAMA}
    assert text(TINY_LLAMA) == base  # the adapters left the base module as it was
    with executor.cache._lock:
        executor.cache._make_room(executor.cache.capacity)
    assert executor.cache.sizes() == {}


def test_a_classifier_adapter_attached_to_its_base_answers_as_trained(store: ModelStore, tmp_path: Path) -> None:
    import torch

    from hypha_celery.runtimes import transformers_adapters, transformers_loading
    from hypha_celery.training.finetune.run import finetune
    from hypha_celery.training.finetune.save import save

    # Given a LoRA run on the tiny classifier (peft also trains its classification head)
    request = Train(model=TINY_CLASSIFIER, new_model="cls-lora", epochs=1, lr=5e-2, batch_size=4, method="lora",
                    lora={"r": 4}, max_steps=6, progress_interval=60.0)
    texts = ["good great", "bad awful"] * 4
    done = finetune(store, request, {"texts": texts, "labels": [1, 0] * 4}, "cpu", lambda update: None)
    encoded = done.model.tokenizer(texts[:2], return_tensors="pt", padding=True)
    with torch.inference_mode():
        trained = done.module(**encoded).logits
    out = tmp_path / "cls"
    out.mkdir()
    save(done, out, merge=False)
    store.add("transformers", out, "cls-lora", base=TINY_CLASSIFIER)
    # When the stored adapter is attached to a freshly loaded base
    base, _ = transformers_loading.load(store.open(TINY_CLASSIFIER), "cpu")
    with torch.inference_mode():
        before = base.module(**encoded).logits
    attached, size = transformers_adapters.attach_adapter(base, store.open("cls-lora"))
    transformers_adapters.activate(attached)
    with torch.inference_mode():
        adapted = attached.module(**encoded).logits
    transformers_adapters.activate(base)
    with torch.inference_mode():
        after = base.module(**encoded).logits
    # Then it answers as the trained model did, and the base as before
    assert torch.allclose(adapted, trained, atol=1e-5) and not torch.allclose(adapted, before, atol=1e-3)
    assert torch.equal(after, before) and 0 < size < 100_000


def test_an_adapter_request_is_sized_on_its_base(store: ModelStore, tmp_path: Path) -> None:
    from hypha_celery.stages.sizing import requirements_for_model

    if not store.has("lora-a"):
        _adapter(store, "lora-a", 1, tmp_path)
    adapter, base = store.manifest("lora-a"), store.manifest(TINY_LLAMA)
    config = parse_config({"worker": {}})

    def memory(held: set[str]) -> int:
        req = requirements_for_model(config, {"cpu_cores": 1}, adapter, holds=lambda model, gpu: model in held,
                                     tokens=100, base=base)
        return req.memory

    plain = requirements_for_model(config, {"cpu_cores": 1}, base, holds=lambda model, gpu: False, tokens=100).memory
    held_base = requirements_for_model(config, {"cpu_cores": 1}, base, holds=lambda model, gpu: True, tokens=100).memory
    adapter_bytes = adapter.weights_bytes_at("float32")
    # Nothing held: the base's weights and KV cache plus the adapter; base held: the adapter on top of the KV cache
    assert memory(set()) == plain + adapter_bytes
    assert memory({TINY_LLAMA}) == held_base + adapter_bytes
    assert memory({TINY_LLAMA, "lora-a"}) == held_base


def test_an_adapter_is_fetched_from_a_source_and_checked_against_its_files(store: ModelStore, tmp_path: Path) -> None:
    if not store.has("lora-a"):
        _adapter(store, "lora-a", 1, tmp_path)
    config = parse_config({"worker": {"models": {"sources": [{"type": "local", "path": str(store.root)}]}}})
    # Given a worker store that fetches from the shared store: the adapter arrives whole and verified
    fetched = ModelStore(tmp_path / "fetched", config.models.sources)
    assert fetched.manifest("lora-a").adapter_of == store.manifest("lora-a").adapter_of
    # When a source serves an adapter whose manifest misstates its weights
    origin = ModelStore(tmp_path / "origin")
    shutil.copytree(store.path("lora-a"), origin.path("lora-b"))
    manifest = json.loads((origin.path("lora-b") / "manifest.json").read_text())
    manifest["id"] = "lora-b"
    manifest["memory"]["parameters"] += 1
    (origin.path("lora-b") / "manifest.json").write_text(json.dumps(manifest))
    other = parse_config({"worker": {"models": {"sources": [{"type": "local", "path": str(origin.root)}]}}})
    # Then the fetch is refused
    with pytest.raises(UnsupportedModel, match="memory"):
        ModelStore(tmp_path / "fetched-2", other.models.sources).manifest("lora-b")


# The README's LoRA example (*Fine-tuning transformers models*): texts.txt, then `run train ... --method lora`.
README_TEXTS = ["The cat sat on the mat.", "The cat sat on the warm windowsill.", "The cat sat on my keyboard again.",
                "The cat sat on the fence and watched the birds.", "A cat sleeps most of the day.",
                "Cats like to sit in boxes.", "The cat sat on the sofa.", "My cat sat on the newspaper."]


def test_lora_with_default_settings_changes_what_the_readme_example_generates(store: ModelStore, tmp_path: Path) -> None:
    import torch

    from hypha_celery.executor.child import Executor
    from hypha_celery.protocol import ChildSettings
    from hypha_celery.stages.validation import GenerateParams
    from hypha_celery.training.finetune.run import finetune
    from hypha_celery.training.finetune.save import save
    from hypha_celery.work import Generate, Prompt

    torch.set_num_threads(1)
    # Given the README's example run: its texts, method lora, every other setting left at its default
    spec = _validate(store, model=TINY_LLAMA, data={"texts": README_TEXTS}, method="lora", new_model="readme-lora")
    assert spec.finetune is not None
    request = Train(model=spec.model, new_model=spec.new_model, epochs=spec.epochs, lr=spec.lr,
                    batch_size=spec.batch_size, progress_interval=60.0, **spec.finetune.to_json())
    # When it trains, and the base and the adapter continue the README's prompt
    done = finetune(store, request, {"texts": README_TEXTS}, "cpu", lambda update: None)
    (tmp_path / "out").mkdir()
    save(done, tmp_path / "out", merge=False)
    store.add("transformers", tmp_path / "out", "readme-lora", base=TINY_LLAMA)
    (tmp_path / "tmp").mkdir()
    executor = Executor(ChildSettings(store=str(store.root), cache_size=1 << 30, max_model_size=1 << 30, device="cpu",
                                      sandbox=False, nice=0, memory_mode="off", tmpdir=str(tmp_path / "tmp")),
                        _Replies())  # type: ignore[arg-type]

    def text(model: str) -> str:
        result = executor.generate(Generate(model=model, params=GenerateParams(max_new_tokens=16).to_json(),
                                            prompts=[Prompt(prompt="The cat sat on")], progress_interval=60.0))
        assert result.outputs[0] is not None, result.errors
        return result.outputs[0].text

    # Then the adapter's text is not the base's
    assert text("readme-lora") != text(TINY_LLAMA)
