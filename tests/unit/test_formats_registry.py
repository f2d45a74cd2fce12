"""The store reaches a format only through the registry: a new format is one table entry, no store change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hypha_celery.config import ModelSource
from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats import registry
from hypha_celery.formats.base import Format, Imported, Target
from hypha_celery.formats.safe_files import sha256_file
from hypha_celery.manifest import FORMAT_V2, Bad, FileEntry, Manifest, read_files
from hypha_celery.models.store import ModelStore


def _toy_format(checked: list[str]) -> Format:
    """A format the store has never heard of: one ``toy.bin`` file, a ``magic`` config key its manifest must carry."""
    def store(target: Target, source: bytes, model_id: str, **options: Any) -> Imported:
        with target.transaction(model_id) as new:
            (new.folder / "toy.bin").write_bytes(source)
            entry = FileEntry(sha256=sha256_file(new.folder / "toy.bin"), size=len(source))
            manifest = Manifest(id=model_id, architecture="toy", config={"magic": 7}, input_shape=[1],
                                files={"toy.bin": entry}, format=FORMAT_V2, runtime="toy", task="toy")
            new.install(manifest, options.get("produced_by"))
        return Imported(manifest, [])

    def fields(data: dict[str, Any], common: dict[str, Any], bad: Bad, max_size: int | None) -> dict[str, Any]:
        if common["config"].get("magic") != 7:
            raise bad("has no magic")
        return {"architecture": "toy", "task": "toy", "runtime": "toy", "files": read_files(data["files"], bad, max_size)}

    def check_fetched(folder: Path, manifest: Manifest) -> None:
        checked.append(manifest.id)

    return Format(runtime="toy", manifest_fields=fields, check_fetched=check_fetched, store=store)


def test_every_format_is_listed_under_its_runtime() -> None:
    # Then each entry's key is the runtime its manifests name, and the three known formats are there
    assert all(key == fmt.runtime for key, fmt in registry.FORMATS.items())
    assert set(registry.RUNTIMES) == {"builtin", "transformers", "onnx"}


def test_a_new_format_is_one_entry_in_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a format added to the registry, and nothing else changed
    checked: list[str] = []
    monkeypatch.setattr(registry, "FORMATS", {**registry.FORMATS, "toy": _toy_format(checked)})
    store = ModelStore(tmp_path / "store")
    # When a model of it is added and read back
    imported = store.add("toy", b"\x00toy weights", "t", produced_by={"task_id": "x"})
    # Then the store installed it, reads its manifest through the format's own checks, and verifies its file
    assert store.manifest("t") == imported.manifest and store.produced_by("t") == {"task_id": "x"}
    assert store.open("t").folder == store.path("t")
    # And a manifest breaking the format's rule is refused by it
    data = {**imported.manifest.to_json(), "config": {"magic": 8}}
    with pytest.raises(UnsupportedModel, match="has no magic"):
        registry.read_manifest(data, "t")
    # And a fetch of it is checked by the format too
    fetching = ModelStore(tmp_path / "fetching", sources=[ModelSource(type="local", path=str(tmp_path / "store"))])
    fetching.ensure("t")
    assert checked == ["t"]


def test_an_unknown_format_is_named(tmp_path: Path) -> None:
    # When a model is added in a format the registry lacks, or a manifest names an unknown runtime
    with pytest.raises(UnsupportedModel, match="unknown model format 'gguf'"):
        ModelStore(tmp_path).add("gguf", tmp_path, "m")
    with pytest.raises(UnsupportedModel, match="unknown runtime 'gguf'"):
        registry.read_manifest({"format": FORMAT_V2, "id": "m", "runtime": "gguf"}, "m")
