"""The store hashes a file once and keeps a stamp: unchanged files are not re-read, changed ones are re-verified."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from hypha_celery.errors import UnsupportedModel
from hypha_celery.models import store as store_module
from hypha_celery.models.store import STAMP, ModelStore


def imported(tmp_path: Path) -> tuple[ModelStore, Path]:
    """A store holding one tiny transformers model, imported (and so hashed) once."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (source / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    store = ModelStore(tmp_path / "store")
    store.add("transformers", source, "tiny")
    return store, store.path("tiny") / "model.safetensors"


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path the store hashes from now on."""
    calls: list[Path] = []
    original = store_module.sha256_file

    def counting(path: Path) -> str:
        calls.append(path)
        return original(path)

    monkeypatch.setattr(store_module, "sha256_file", counting)
    return calls


def test_a_cold_load_of_an_unchanged_model_hashes_nothing(tmp_path: Path, hashed: list[Path]) -> None:
    # Given a model imported by one store (which hashed it and wrote the stamp)
    store, _ = imported(tmp_path)
    hashed.clear()
    # When a fresh store (another process, after a restart) verifies it
    ModelStore(store.root).open("tiny")
    # Then no file was read to hash it again
    assert hashed == []


def test_a_touched_file_with_the_same_content_is_hashed_again_and_accepted(tmp_path: Path, hashed: list[Path]) -> None:
    # Given an imported model whose weights file was touched (new mtime, same bytes)
    store, weights = imported(tmp_path)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    hashed.clear()
    # When a fresh store verifies it
    ModelStore(store.root).open("tiny")
    # Then that file alone was hashed again, and the stamp now holds its new mtime
    assert hashed == [weights]
    assert json.loads((weights.parent / STAMP).read_text())["model.safetensors"]["mtime_ns"] == stat.st_mtime_ns + 10**9


def test_a_file_rewritten_with_other_bytes_is_refused_even_with_its_old_mtime(tmp_path: Path) -> None:
    # Given an imported model whose weights were rewritten in place, same size, old mtime put back
    store, weights = imported(tmp_path)
    stat = weights.stat()
    content = bytearray(weights.read_bytes())
    content[-1] = 1
    weights.write_bytes(bytes(content))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # When a fresh store verifies it, Then it is refused as tampered (the ctime gave the rewrite away)
    with pytest.raises(UnsupportedModel, match="does not match the manifest"):
        ModelStore(store.root).open("tiny")


def test_a_garbled_stamp_means_hashing_again_not_an_error(tmp_path: Path, hashed: list[Path]) -> None:
    # Given an imported model whose stamp file is garbage
    store, weights = imported(tmp_path)
    (weights.parent / STAMP).write_text("{not json")
    hashed.clear()
    # When a fresh store verifies it, Then every file is hashed and accepted
    ModelStore(store.root).open("tiny")
    assert sorted(path.name for path in hashed) == ["config.json", "model.safetensors"]
