"""Small guarantees of the store and its config: leftovers, prefixes, manifest types."""

from __future__ import annotations

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
    other = tmp_path / "store" / ".incoming-mlp-big-abcd1234"  # another model's: not ours to touch
    other.mkdir()
    # When the model is fetched
    store.ensure("mlp")
    # Then the leftover is gone and only the model (and the other model's folder) remain
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
