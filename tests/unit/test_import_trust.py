"""Model files stay inside their folder: links and other non-regular files are refused, the size cap holds
before and while copying, and staging folders never outlive their import."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.config import parse_config
from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats import huggingface
from hypha_celery.formats.safe_files import open_regular
from hypha_celery.models.store import ModelStore

SECRET = b"signing_key = 'do-not-leak'\n"


def model_folder(folder: Path) -> Path:
    """A minimal Hugging Face directory: a BERT config, two float32 weights, a tokenizer.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def capped_store(root: Path, cap: str) -> ModelStore:
    """A store opened the way the CLI and the worker open one: from a config naming its max_model_size."""
    return ModelStore.from_config(parse_config({"worker": {"models": {"max_model_size": cap}}}).models, root)


def store_bytes(root: Path) -> bytes:
    """Every regular file's bytes under the store, concatenated (staging folders included)."""
    return b"".join(path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file() and not path.is_symlink())


def staging_folders(root: Path) -> list[str]:
    return sorted(path.name for path in root.rglob(".incoming-*")) if root.exists() else []


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A host file outside any model folder (a worker's config with a key in it)."""
    path = tmp_path / "host" / "worker.toml"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def _plant_link(folder: Path, secret: Path) -> str:
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(secret)
    return "tokenizer.json is a symbolic link"


def _plant_linked_folder(folder: Path, secret: Path) -> str:
    outside = secret.parent / "pooling"
    outside.mkdir()
    (outside / "config.json").write_bytes(SECRET)
    (folder / "1_Pooling").symlink_to(outside, target_is_directory=True)
    return "1_Pooling is a symbolic link"


def _plant_skipped_link(folder: Path, secret: Path) -> str:
    (folder / "README.md").symlink_to(secret)
    return "README.md is a symbolic link"


def _plant_fifo(folder: Path, secret: Path) -> str:
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    return "tokenizer.json is a FIFO"


def _plant_hardlink(folder: Path, secret: Path) -> str:
    secret.chmod(0o600)  # another user's key could not be read; this worker's own is the one at risk
    (folder / "tokenizer.json").unlink()
    os.link(secret, folder / "tokenizer.json")
    return "tokenizer.json has 2 hard links"


@pytest.mark.parametrize("plant", [_plant_link, _plant_linked_folder, _plant_skipped_link, _plant_fifo,
                                   _plant_hardlink])
def test_a_link_or_fifo_in_a_model_folder_refuses_the_import(tmp_path: Path, secret: Path, plant: Any) -> None:
    # Given a model folder with a symbolic link to a host file (a file, a folder, a skipped file) or a FIFO in it
    folder = model_folder(tmp_path / "src")
    named = plant(folder, secret)
    store = capped_store(tmp_path / "store", "1GB")
    # When it is imported
    with pytest.raises(UnsupportedModel) as refused:
        store.add("transformers", folder, "m")
    # Then the import is refused naming the entry, and the host file's bytes are nowhere in the store
    assert named in str(refused.value)
    assert not store.has("m") and SECRET not in store_bytes(tmp_path / "store")
    assert staging_folders(tmp_path / "store") == []


def test_a_link_swapped_in_after_the_scan_is_refused_when_opened(tmp_path: Path, secret: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a clean model folder whose tokenizer.json becomes a link to a host file once the folder was scanned
    folder = model_folder(tmp_path / "src")
    identify = huggingface.identify

    def swap(*args: Any) -> Any:
        _plant_link(folder, secret)
        return identify(*args)

    monkeypatch.setattr(huggingface, "identify", swap)
    store = capped_store(tmp_path / "store", "1GB")
    # When it is imported
    with pytest.raises(UnsupportedModel, match=r"tokenizer\.json is a symbolic link"):
        store.add("transformers", folder, "m")
    # Then the open refused the link: the host file's bytes never reached the store
    assert not store.has("m") and SECRET not in store_bytes(tmp_path / "store")


def test_a_hardlink_made_after_the_scan_is_refused_when_opened(tmp_path: Path, secret: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a clean model folder whose tokenizer.json becomes a hard link to a host file once the folder was scanned
    folder = model_folder(tmp_path / "src")
    identify = huggingface.identify

    def swap(*args: Any) -> Any:
        _plant_hardlink(folder, secret)
        return identify(*args)

    monkeypatch.setattr(huggingface, "identify", swap)
    store = capped_store(tmp_path / "store", "1GB")
    # When it is imported
    with pytest.raises(UnsupportedModel, match=r"tokenizer\.json has 2 hard links"):
        store.add("transformers", folder, "m")
    # Then the open refused it: the host file's bytes never reached the store
    assert not store.has("m") and SECRET not in store_bytes(tmp_path / "store")


@contextmanager
def _watch_staging(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every staging folder the store makes (where copying starts)."""
    made: list[str] = []
    real = ModelStore._staging

    @contextmanager
    def spy(self: ModelStore, model_id: str) -> Iterator[Path]:
        with real(self, model_id) as staging:
            made.append(staging.name)
            yield staging

    monkeypatch.setattr(ModelStore, "_staging", spy)
    yield made


def test_a_sparse_model_above_the_cap_is_refused_before_a_byte_is_copied(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a model folder whose weights file is sparse: 64 MB long, next to nothing on disk; the cap is 1 MB
    folder = model_folder(tmp_path / "src")
    os.truncate(folder / "model.safetensors", 64 * 2**20)
    store = capped_store(tmp_path / "store", "1MB")
    # When it is imported
    with _watch_staging(monkeypatch) as made, pytest.raises(UnsupportedModel, match="above max_model_size"):
        store.add("transformers", folder, "m")
    # Then it was refused from the files' sizes: no staging folder was ever made, nothing was written
    assert made == [] and not store.has("m") and staging_folders(tmp_path / "store") == []


def test_a_file_that_grows_after_it_was_measured_stops_at_the_cap(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a model folder under the 1 MB cap whose weights grow (sparse, to 64 MB) once they were measured and checked
    folder = model_folder(tmp_path / "src")
    read_checkpoint = huggingface.read_checkpoint

    def grow(*args: Any) -> Any:
        checked = read_checkpoint(*args)
        os.truncate(folder / "model.safetensors", 64 * 2**20)
        return checked

    monkeypatch.setattr(huggingface, "read_checkpoint", grow)
    store = capped_store(tmp_path / "store", "1MB")
    # When it is imported
    with pytest.raises(UnsupportedModel, match="grew past max_model_size while it was copied"):
        store.add("transformers", folder, "m")
    # Then the copy stopped at the cap and its staging folder is gone
    assert not store.has("m") and staging_folders(tmp_path / "store") == []


def test_a_dead_imports_staging_is_swept_when_the_store_opens_and_a_live_ones_kept(tmp_path: Path) -> None:
    # Given staging folders of imports killed mid-copy (one in the sandboxed executor's .incoming), and one of an
    # import that is still running in another process (it holds the model's lock)
    root = tmp_path / "store"
    dead = [root / ".incoming-a-abcd1234", root / ".incoming-b.v2-x_y1z2w3", root / ".incoming" / ".incoming-c-12345678"]
    for path in dead:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half a model")
    live = root / ".incoming-live-abcd1234"
    live.mkdir()
    (root / ".locks").mkdir()
    with open(root / ".locks" / "live.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # When the store is opened
        capped_store(root, "1GB")
        # Then the dead imports' folders are gone and the live one's is untouched
        assert [path.exists() for path in dead] == [False, False, False] and live.exists()


def test_an_import_sweeps_another_models_dead_staging(tmp_path: Path) -> None:
    # Given a store holding the staging folder of another model's import that was killed
    root = tmp_path / "store"
    leftover = root / ".incoming-other-abcd1234"
    leftover.mkdir(parents=True)
    store = ModelStore(root)
    # When a model is imported
    store.add("transformers", model_folder(tmp_path / "src"), "m")
    # Then the dead folder is gone and the model is installed
    assert not leftover.exists() and store.list() == ["m"]


def test_an_onnx_folder_whose_model_is_a_link_is_refused(tmp_path: Path, secret: Path) -> None:
    # Given a folder holding model.onnx as a link to a host file
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "model.onnx").symlink_to(secret)
    store = capped_store(tmp_path / "store", "1GB")
    # When it is imported, Then it is refused naming the link, and the host file's bytes are nowhere in the store
    with pytest.raises(UnsupportedModel, match=r"model\.onnx is a symbolic link"):
        store.add("onnx", folder, "m")
    assert SECRET not in store_bytes(tmp_path / "store")



@pytest.mark.parametrize("relative", ["../host/worker.toml", "/etc/passwd", "src\\config.json", "src/../host/worker.toml",
                                      "src//config.json", "./src/config.json"])
def test_a_path_that_could_leave_the_folder_is_refused_before_any_open(tmp_path: Path, secret: Path,
                                                                       relative: str) -> None:
    # Given a folder beside the host file, When a name that climbs out, is absolute or uses a backslash is opened,
    # Then it is refused as not a path inside the folder
    model_folder(tmp_path / "src")
    with pytest.raises(UnsupportedModel, match="not a path inside the folder"):
        open_regular(tmp_path, relative)
