"""LoRA adapters through a real worker: requests for different adapters of one base share a batch."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.models.examples import TINY_LLAMA
from hypha_celery.models.store import ModelStore
from tests.unit.test_finetune import _adapter

SMALL = {"cpu_cores": 1, "memory": "1GB"}
PROMPT = "the cat sat"


def test_generations_for_different_adapters_of_one_base_share_a_batch(start_worker, celery_client, model_dir: Path,
                                                                       tmp_path: Path) -> None:
    # Given a worker whose store holds the tiny Llama and two LoRA adapters of it, and that waits 0.3 s to batch
    store_dir = tmp_path / "store"
    shutil.copytree(model_dir, store_dir, ignore=shutil.ignore_patterns(".locks"))
    for name, seed in (("lora-a", 1), ("lora-b", 2)):
        _adapter(ModelStore(store_dir), name, seed, tmp_path)
    start_worker({"models": {"model_dir": str(store_dir)}, "max_concurrent_tasks": 6,
                  "batching": {"max_queue_delay_microseconds": 300_000}})
    app = celery_client()
    models = [TINY_LLAMA, "lora-a", "lora-b"]

    def send(model: str) -> Any:
        return app.send_task("hypha.generate", kwargs={"model": model, "prompt": PROMPT, "max_new_tokens": 12,
                                                       "requirements": SMALL})

    # ... and each model's text when it runs alone (this also loads the base and attaches both adapters)
    alone = {model: send(model).get(timeout=120) for model in models}
    assert alone[TINY_LLAMA]["metrics"]["batch_size"] == 1
    # When one request for each arrives together
    results = [(model, send(model)) for model in models]
    done = [(model, pending.get(timeout=120)) for model, pending in results]
    # Then some ran in one batch (each of a different model: one request per model), and every text is the
    # one its model gave alone
    assert max(result["metrics"]["batch_size"] for _, result in done) > 1, [r["metrics"] for _, r in done]
    for model, result in done:
        assert result["output"]["text"] == alone[model]["output"]["text"], model
    assert len({alone[model]["output"]["text"] for model in models}) == 3


def test_an_adapter_that_cannot_attach_fails_alone_in_a_mixed_batch(start_worker, celery_client, model_dir: Path,
                                                                     tmp_path: Path) -> None:
    # Given an adapter, and a copy of it whose manifest names another version of the base (refused on attach)
    store_dir = tmp_path / "store"
    shutil.copytree(model_dir, store_dir, ignore=shutil.ignore_patterns(".locks"))
    store = ModelStore(store_dir)
    _adapter(store, "lora-a", 1, tmp_path)
    shutil.copytree(store.path("lora-a"), store.path("orphan"))
    manifest = store.path("orphan") / "manifest.json"
    sha256 = store.manifest("lora-a").adapter_of.sha256  # type: ignore[union-attr]
    manifest.write_text(manifest.read_text().replace(sha256, "0" * 64).replace('"id": "lora-a"', '"id": "orphan"'))
    start_worker({"models": {"model_dir": str(store_dir)}, "max_concurrent_tasks": 6,
                  "batching": {"max_queue_delay_microseconds": 300_000}})
    app = celery_client()

    def send(model: str) -> Any:
        return app.send_task("hypha.generate", kwargs={"model": model, "prompt": PROMPT, "max_new_tokens": 12,
                                                       "requirements": SMALL})

    alone = send("lora-a").get(timeout=120)["output"]["text"]
    # When both are asked for together (one batch of the base's family)
    good, bad = send("lora-a"), send("orphan")
    # Then the good adapter answers as alone, and only the orphan fails, naming why
    assert good.get(timeout=120)["output"]["text"] == alone
    with pytest.raises(Exception) as caught:
        bad.get(timeout=120)
    assert type(caught.value).__name__ == "UnsupportedModel" and "trained on another" in str(caught.value)
