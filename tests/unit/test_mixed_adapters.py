"""A batch that mixes LoRA adapters of one base (and the base itself): each row as if it ran alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hypha_celery.models.examples import TINY_CLASSIFIER, TINY_LLAMA, init_examples
from hypha_celery.models.store import ModelStore
from hypha_celery.protocol import ChildSettings
from hypha_celery.stages.validation import GenerateParams
from hypha_celery.work import Generate, Infer, Prompt, Train
from tests.unit.test_finetune import _adapter, _Replies

PROMPTS = ["the cat sat", "the cat sat", "the cat sat", "the sun rose over the hill"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("mixed-store")
    init_examples(root)
    return ModelStore(root)


@pytest.fixture
def executor(store: ModelStore, tmp_path: Path) -> Any:
    from hypha_celery.executor.child import Executor

    for name, seed in (("mix-a", 1), ("mix-b", 2)):
        if not store.has(name):
            _adapter(store, name, seed, tmp_path)
    if not store.has("cls-a"):
        _classifier_adapter(store, "cls-a", [1, 0], tmp_path)
        _classifier_adapter(store, "cls-b", [0, 1], tmp_path)
    (tmp_path / "tmp").mkdir()
    settings = ChildSettings(store=str(store.root), cache_size=1 << 30, max_model_size=1 << 30, device="cpu",
                             sandbox=False, nice=0, memory_mode="off", tmpdir=str(tmp_path / "tmp"))
    return Executor(settings, _Replies())  # type: ignore[arg-type]


def _classifier_adapter(store: ModelStore, name: str, labels: list[int], tmp_path: Path) -> None:
    """A LoRA adapter of the tiny classifier (peft also trains its head, a modules_to_save copy)."""
    from hypha_celery.training.finetune.run import finetune
    from hypha_celery.training.finetune.save import save

    request = Train(model=TINY_CLASSIFIER, new_model=name, epochs=1, lr=5e-2, batch_size=4, method="lora",
                    lora={"r": 4}, max_steps=6, progress_interval=60.0)
    done = finetune(store, request, {"texts": ["good great", "bad awful"] * 4, "labels": labels * 4}, "cpu",
                    lambda update: None)
    out = tmp_path / name
    out.mkdir()
    save(done, out, merge=False)
    store.add("transformers", out, name, base=TINY_CLASSIFIER)


def _generate(executor: Any, models: list[str], prompts: list[str]) -> list[str]:
    request = Generate(model=models[0], params=GenerateParams(max_new_tokens=12).to_json(),
                       prompts=[Prompt(prompt=p) for p in prompts], progress_interval=60.0,
                       models=models if len(set(models)) > 1 else None)
    result = executor.generate(request)
    assert all(error is None for error in result.errors), result.errors
    return [output.text for output in result.outputs]


def test_a_generation_batch_mixing_adapters_and_the_base_equals_each_row_alone(executor: Any) -> None:
    # Given the tiny Llama and two adapters of it, each row's text generated alone
    models = [TINY_LLAMA, "mix-a", "mix-b", "mix-a"]
    alone = [_generate(executor, [model], [prompt])[0] for model, prompt in zip(models, PROMPTS, strict=True)]
    # When the four rows run as one batch, each with its own adapter (or none)
    mixed = _generate(executor, models, PROMPTS)
    # Then each row's text is the one it got alone, and on one prompt base and adapters differ
    assert mixed == alone
    assert len(set(alone[:3])) == 3, alone
    # And after it the base, and each adapter alone, answer as before (no adapter left selected)
    assert _generate(executor, [TINY_LLAMA], [PROMPTS[0]]) == [alone[0]]
    assert _generate(executor, ["mix-b"], [PROMPTS[2]]) == [alone[2]]
    # And the cache holds the base once plus each adapter
    assert set(executor.cache.sizes()) == {TINY_LLAMA, "mix-a", "mix-b"}


def test_a_classification_batch_mixing_adapters_equals_each_item_alone(executor: Any) -> None:
    # Given the tiny classifier and two adapters trained to opposite labels
    items = [{"texts": ["good great", "bad awful"]}, {"texts": ["good great"]}, {"texts": ["bad awful", "good"]}]
    models = ["cls-a", TINY_CLASSIFIER, "cls-b"]

    def infer(batch_models: list[str], batch_items: list[dict[str, Any]]) -> list[Any]:
        result = executor.infer(Infer(model=batch_models[0], items=batch_items,
                                      models=batch_models if len(set(batch_models)) > 1 else None))
        assert all(error is None for error in result.errors), result.errors
        return result.outputs

    alone = [infer([model], [item])[0] for model, item in zip(models, items, strict=True)]
    # (each alone again: a request for the base in between leaves an adapter's own classification head enabled)
    assert [infer([model], [item])[0] for model, item in zip(models, items, strict=True)] == alone
    # When the three requests run as one batch
    mixed = infer(models, items)
    # Then each gets the labels and scores it got alone (within float tolerance), and the adapters disagree
    for got, want in zip(mixed, alone, strict=True):
        assert [row["label"] for row in got] == [row["label"] for row in want]
        assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(got, want, strict=True))
    assert alone[0][0]["label"] != infer(["cls-b"], [items[0]])[0][0]["label"]
