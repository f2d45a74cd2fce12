"""hypha.train on transformers models through a real worker: a full fine-tune learns, LoRA writes an adapter entry."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.errors import UnsupportedModel
from hypha_celery.harness.launch import worker_env
from hypha_celery.manifest import ADAPTER_FILES
from hypha_celery.models.examples import TINY_CLASSIFIER, TINY_LLAMA
from hypha_celery.models.store import ModelStore
from tests.conftest import ROOT

CORES = {"cpu_cores": 1}  # memory: "auto", sized for training from the manifest
POSITIVE = ("loved", "wonderful", "sunny", "warm", "fresh", "faster", "better")
NEGATIVE = ("terrible", "boring", "rain", "fell", "sharply", "heavy", "expected")
FILLER = ("the", "was", "and", "a", "today")


def _toy(n: int, seed: int) -> tuple[list[str], list[str]]:
    """A separable task: each text holds words of one sentiment's list (plus filler); the label is that list's."""
    rng = random.Random(seed)
    texts, labels = [], []
    for index in range(n):
        label = "positive" if index % 2 == 0 else "negative"
        words = [rng.choice(POSITIVE if label == "positive" else NEGATIVE) for _ in range(3)] + [rng.choice(FILLER)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def _watch(job: Any) -> list[dict[str, Any]]:
    """Every distinct PROGRESS the client sees until the task ends."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 300
    while not job.ready() and time.monotonic() < deadline:
        info = job.info if job.state == "PROGRESS" else None
        if isinstance(info, dict) and (not seen or info != seen[-1]):
            seen.append(info)
        time.sleep(0.02)
    return seen


def test_a_full_fine_tune_of_the_tiny_classifier_learns_a_separable_task(start_worker, celery_client,
                                                                          store_dir: Path) -> None:
    # Given a worker with the tiny BERT classifier, and held-out texts it gets at about chance before training
    start_worker({"models": {"model_dir": str(store_dir)}})
    app = celery_client()
    texts, labels = _toy(64, seed=1)
    held_texts, held_labels = _toy(40, seed=2)

    def accuracy(model: str) -> float:
        out = app.send_task("hypha.infer", kwargs={"model": model, "texts": held_texts,
                                                   "requirements": CORES}).get(timeout=120)["output"]
        return sum(row["label"] == want for row, want in zip(out, held_labels, strict=True)) / len(held_labels)

    before = accuracy(TINY_CLASSIFIER)
    # When it is fine-tuned in full on the training texts, labels given by name
    job = app.send_task("hypha.train", kwargs={
        "model": TINY_CLASSIFIER, "data": {"texts": texts, "labels": labels}, "epochs": 8, "lr": 2e-3,
        "batch_size": 8, "warmup_steps": 2, "seed": 3, "new_model": "tiny-bert-sentiment", "requirements": CORES,
    })
    progress = _watch(job)
    result = job.get(timeout=60)
    output = result["output"]
    # Then the result reports the run, and the new model is a transformers model in the store, served at once
    assert output["model_id"] == "tiny-bert-sentiment" and output["steps"] == 8 * 8
    assert output["loss_curve"][-1] < output["loss_curve"][0] and output["trained_tokens"] > 0
    assert output["metrics"]["train_accuracy"] >= 0.9
    manifest = ModelStore(store_dir).manifest("tiny-bert-sentiment")
    assert (manifest.format, manifest.runtime, manifest.parent) == ("hypha-model/2", "transformers", TINY_CLASSIFIER)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest.files)
    assert manifest.memory is not None and manifest.labels == ["negative", "positive"]
    after = accuracy("tiny-bert-sentiment")
    assert after >= 0.85 and after >= before + 0.2, (before, after)
    # And the client saw progress with tokens/s and an ETA
    running = [p for p in progress if p.get("stage") == "run"]
    assert running and {"step", "epoch", "loss", "percent", "tokens_per_s", "eta_s"} <= set(running[-1])


def test_lora_on_the_tiny_llama_stores_an_adapter_entry(start_worker, celery_client, store_dir: Path) -> None:
    # Given a worker with the tiny Llama
    start_worker({"models": {"model_dir": str(store_dir)}})
    app = celery_client()
    texts = ["the cat sat on the mat", "the dog ran across the park", "the train leaves at nine"] * 4
    # When a LoRA run trains it for a fixed number of steps
    job = app.send_task("hypha.train", kwargs={
        "model": TINY_LLAMA, "data": {"texts": texts}, "method": "lora",
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "max_steps": 12, "lr": 1e-2,
        "batch_size": 4, "new_model": "tiny-llama-lora", "requirements": CORES,
    })
    result = job.get(timeout=300)
    output = result["output"]
    # Then the loss fell, and the entry holds only peft's two files and names its base by id and sha256
    assert output["steps"] == 12 and output["final_loss"] < output["loss_curve"][0]
    assert output["trained_tokens"] > 0 and output["metrics"]["trainable_parameters"] < 10_000
    store = ModelStore(store_dir)
    files = sorted(p.name for p in store.path("tiny-llama-lora").iterdir() if not p.name.startswith("."))
    assert files == sorted([*ADAPTER_FILES, "manifest.json"])
    adapter = store.manifest("tiny-llama-lora")
    assert adapter.adapter_of is not None
    assert (adapter.adapter_of.id, adapter.adapter_of.sha256) == (TINY_LLAMA, store.manifest_sha256(TINY_LLAMA))
    # And the adapter serves through hypha.generate, attached to the cached base: its text differs from the base's
    def generate(model: str) -> dict[str, Any]:
        return app.send_task("hypha.generate", kwargs={"model": model, "prompt": "the cat", "max_new_tokens": 12,
                                                       "requirements": CORES}).get(timeout=120)

    base = generate(TINY_LLAMA)
    tuned = generate("tiny-llama-lora")
    assert tuned["output"]["text"] != base["output"]["text"]
    assert generate(TINY_LLAMA)["output"]["text"] == base["output"]["text"]
    assert generate("tiny-llama-lora")["metrics"]["cache_hit"]
    # And an adapter of a base whose manifest changed since is refused, not attached
    store.path("tiny-llama-lora").rename(store.path("orphan"))
    orphan = store.path("orphan") / "manifest.json"
    orphan.write_text(orphan.read_text().replace(adapter.adapter_of.sha256, "0" * 64).replace(
        '"id": "tiny-llama-lora"', '"id": "orphan"'))
    with pytest.raises(UnsupportedModel, match="trained on another"):
        generate("orphan")


def test_lora_with_merge_on_a_stored_text_data_set_stores_a_full_model(start_worker, celery_client,
                                                                         store_dir: Path) -> None:
    # Given a text data set in the store
    ModelStore(store_dir).save_texts("cats", ["the cat sat on the mat"] * 4)
    start_worker({"models": {"model_dir": str(store_dir)}})
    app = celery_client()
    # When a LoRA run on it asks for the merged model
    app.send_task("hypha.train", kwargs={
        "model": TINY_LLAMA, "data": {"ref": "cats"}, "method": "lora", "merge": True,
        "max_steps": 3, "batch_size": 4, "new_model": "tiny-llama-merged", "requirements": CORES,
    }).get(timeout=300)
    # Then a full model without adapter files is stored, and it generates
    manifest = ModelStore(store_dir).manifest("tiny-llama-merged")
    assert manifest.adapter_of is None and "model.safetensors" in manifest.files
    assert not any(name.startswith("adapter") for name in manifest.files)
    out = app.send_task("hypha.generate", kwargs={"model": "tiny-llama-merged", "prompt": "the cat",
                                                  "max_new_tokens": 4, "requirements": CORES}).get(timeout=120)
    assert out["output"]["usage"]["completion_tokens"] >= 1


def test_the_cli_trains_drawing_progress_and_printing_the_model_id(start_worker, store_dir: Path, redis_url: str,
                                                                    tmp_path: Path) -> None:
    # Given a worker with the tiny Llama and a text file of training texts, one a line
    start_worker({"models": {"model_dir": str(store_dir)}})
    data = tmp_path / "texts.txt"
    data.write_text("the cat sat on the mat\nthe dog ran across the park\n\nthe train leaves at nine\n")
    # When `hypha-celery run train` trains a LoRA adapter for long enough that the client sees it run
    out = subprocess.run(
        [sys.executable, "-m", "hypha_celery.cli", "run", "train", "--model", TINY_LLAMA, "--data", str(data),
         "--method", "lora", "--lora-r", "4", "--target-module", "q_proj", "--target-module", "v_proj",
         "--max-steps", "300", "--batch-size", "3", "--lr", "0.01", "--new-model", "tiny-llama-cli", "--cpu-cores", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=worker_env(redis_url, redis_url, redis_url),
    )
    # Then stderr shows plain progress lines (stderr is a pipe: no bar), the last one the finished run,
    # and stdout names the new model and its final loss
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("step ")]
    assert len(lines) >= 2, out.stderr
    assert any(" 100.0%" not in line and "tok/s" in line and "ETA" in line for line in lines), out.stderr
    assert lines[-1].startswith("step 300/300  100.0%  loss ") and "\r" not in out.stderr
    assert "model_id: tiny-llama-cli" in out.stdout.splitlines()
    final = ModelStore(store_dir).manifest("tiny-llama-cli")
    assert final.adapter_of is not None and final.adapter_of.id == TINY_LLAMA
    assert any(line.startswith("final_loss: ") for line in out.stdout.splitlines())
