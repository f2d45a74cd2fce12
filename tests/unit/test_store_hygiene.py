"""Small guarantees of the store and its config: leftovers, prefixes, manifest types."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pytest

from hypha_celery.config import parse_config
from hypha_celery.errors import UnsupportedModel
from hypha_celery.models.store import ModelStore


def test_a_dead_fetchs_staging_folder_is_cleaned_up(tmp_path: Path, model_dir: Path) -> None:
    # Given a staging folder a killed process left behind, and a source that has the model
    store = ModelStore(tmp_path / "store", parse_config(
        {"worker": {"models": {"sources": [{"type": "local", "path": str(model_dir)}]}}}).models.sources)
    leftover = tmp_path / "store" / ".incoming-mlp-abcd1234"
    leftover.mkdir(parents=True)
    other = tmp_path / "store" / ".incoming-mlp-big-abcd1234"  # another model's, whose import is alive: it holds the lock
    other.mkdir()
    (tmp_path / "store" / ".locks").mkdir()
    with open(tmp_path / "store" / ".locks" / "mlp-big.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # When the model is fetched
        store.ensure("mlp")
    # Then the leftover is gone and only the model (and the live import's folder) remain
    assert not leftover.exists() and other.exists() and store.list() == ["mlp"]


def test_an_s3_prefix_names_a_folder() -> None:
    cfg = parse_config({"worker": {"models": {"sources": [{"type": "s3", "bucket": "b", "prefix": "models"}]}}})
    assert cfg.models.sources[0].prefix == "models/"


def test_a_manifest_with_a_non_boolean_batchable_is_refused(tmp_path: Path, model_dir: Path) -> None:
    shutil.copytree(model_dir / "mlp", tmp_path / "mlp")
    manifest = json.loads((tmp_path / "mlp" / "manifest.json").read_text())
    manifest["batchable"] = "false"
    (tmp_path / "mlp" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedModel, match="batchable"):
        ModelStore(tmp_path).manifest("mlp")


def test_a_store_with_a_staging_folder_assembles_new_models_there(tmp_path: Path) -> None:
    from hypha_celery.formats.builtin import build

    # Given a store whose staging folder is model_dir/.incoming (a sandboxed training executor's),
    # holding a dead save's leftover
    root = tmp_path / "store"
    leftover = root / ".incoming" / ".incoming-mlp-abcd1234"
    leftover.mkdir(parents=True)
    store = ModelStore(root, staging=root / ".incoming")
    config = {"in_features": 4, "hidden": 8, "out_features": 3}
    # When a model is saved
    store.add("builtin", build("mlp", config), "mlp", architecture="mlp", config=config, input_shape=[4])
    # Then it is installed in model_dir by a rename from the staging folder, which is left empty
    assert store.list() == ["mlp"] and list((root / ".incoming").iterdir()) == []
    assert ModelStore(root).open("mlp").manifest.architecture == "mlp"


@pytest.mark.parametrize("step", ["peek", "ensure"])
def test_a_mistyped_model_id_names_the_store_and_how_to_list_it(tmp_path: Path, step: str) -> None:
    # Given a store whose only source is a shared folder (DiLoCo's models/), and an id with a typo
    shared = tmp_path / "shared" / "models"
    shared.mkdir(parents=True)
    store = ModelStore(tmp_path / "store", parse_config(
        {"worker": {"models": {"sources": [{"type": "local", "path": str(shared)}]}}}).models.sources)
    # When the worker looks the model up (sizing peeks; loading ensures)
    with pytest.raises(UnsupportedModel) as caught:
        getattr(store, step)("tiny-lama")
    # Then the message leads with the store, and says how to see what it holds
    message = str(caught.value)
    assert message.startswith(f"model 'tiny-lama' is not in the store ({store.root})")
    assert "`hypha-celery models list`" in message
