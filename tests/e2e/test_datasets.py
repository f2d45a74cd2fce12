"""Training data sets by reference: stored, fetched and verified like models, then trained on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hypha_celery.config import parse_config
from hypha_celery.errors import UnsupportedModel
from hypha_celery.models.examples import clusters
from hypha_celery.models.store import ModelStore

ROOT = Path(__file__).resolve().parents[2]


def test_a_stored_data_set_is_fetched_and_verified_like_a_model(tmp_path: Path) -> None:
    rows, labels = clusters(30)
    origin = ModelStore(tmp_path / "origin")
    origin.save_dataset("iris-like", rows, labels)
    sources = parse_config({"worker": {"models": {"sources": [{"type": "local", "path": str(tmp_path / "origin")}]}}})
    store = ModelStore(tmp_path / "store", sources.models.sources)
    manifest, path = store.dataset("iris-like")
    assert manifest.rows == 30 and json.loads(path.read_text()) == {"inputs": rows, "targets": labels}
    assert store.list() == []  # data sets are not models
    with pytest.raises(UnsupportedModel, match=r"expected 'hypha-model/1'|not in the store|could not be fetched"):
        store.manifest("iris-like")
    # a tampered copy is refused
    path.write_text(path.read_text().replace("0.", "9.", 1))
    with pytest.raises(UnsupportedModel, match=r"sha256|bytes"):
        ModelStore(tmp_path / "store").dataset("iris-like")


def test_datasets_add_from_the_command_line(tmp_path: Path) -> None:
    rows, labels = clusters(6)
    file = tmp_path / "data.json"
    file.write_text(json.dumps({"inputs": rows, "targets": labels}))
    out = subprocess.run([sys.executable, "-m", "hypha_celery.cli", "datasets", "add", "six", str(file),
                          "--dir", str(tmp_path / "store")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("six: 6 rows")
    assert ModelStore(tmp_path / "store").dataset("six")[0].rows == 6


def test_training_on_a_data_set_reference(start_worker, celery_client, tmp_path: Path, model_dir: Path) -> None:
    store_dir = tmp_path / "store"
    shutil.copytree(model_dir, store_dir, ignore=shutil.ignore_patterns(".locks"))
    rows, labels = clusters(600, seed=8)
    ModelStore(store_dir).save_dataset("clusters-600", rows, labels)
    start_worker({"models": {"model_dir": str(store_dir)}})
    app = celery_client()
    result = app.send_task("hypha.train", kwargs={"model": "mlp", "data": {"ref": "clusters-600"}, "epochs": 20,
                                                  "lr": 0.01, "new_model": "mlp-from-ref"}).get(timeout=120)
    assert result["output"]["model_id"] == "mlp-from-ref" and result["output"]["samples"] == 600
    with pytest.raises(UnsupportedModel, match="no-such-data"):
        app.send_task("hypha.train", kwargs={"model": "mlp", "data": {"ref": "no-such-data"}}).get(timeout=60)
