"""The one byte layer: sources and shared storage move bytes only through it, and its caps hold while copying."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest

from hypha_celery.errors import SharedStorageError, UnsupportedModel
from hypha_celery.models.bytes import LocalFolder, Reader, copy, read_small

MODELS = Path(__file__).resolve().parents[2] / "hypha_celery" / "models"
# What reaching a place takes: whoever imports these or opens files below a root is a second byte layer.
_TRANSPORTS = {"urllib", "http", "boto3", "botocore", "hypha_celery.formats.safe_files"}


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module if node.module.startswith("hypha_celery") else node.module.split(".")[0])
    return names


def test_sources_and_shared_storage_reach_places_only_through_the_byte_layer() -> None:
    # Then neither the model sources nor shared storage import a transport or open files below a root themselves
    for name in ("sources.py", "shared_storage.py"):
        imported = _imported(MODELS / name)
        assert imported & _TRANSPORTS == set(), name
        assert "hypha_celery.models.bytes" in imported, name
    # And the byte layer does (the check above can fail)
    assert _imported(MODELS / "bytes.py") & _TRANSPORTS


def test_a_copy_stops_at_its_limit_before_writing_the_bytes_past_it() -> None:
    # Given 3 MiB behind a reader, and a limit of 1.5 MiB
    reader = Reader(io.BytesIO(b"x" * (3 << 20)), "three.bin", SharedStorageError)
    out = io.BytesIO()
    # When it is copied, Then the caller's error is raised and only whole chunks within the limit were written
    with pytest.raises(SharedStorageError, match="too long"):
        copy(reader, out, limit=(3 << 19), over="three.bin is too long")
    assert len(out.getvalue()) == 1 << 20


def test_a_small_read_refuses_what_is_announced_or_found_larger(tmp_path: Path) -> None:
    # Given a local folder holding a 100-byte file
    (tmp_path / "big.json").write_bytes(b"{" * 100)
    folder = LocalFolder(tmp_path, UnsupportedModel)
    # Then a small read capped at 10 bytes refuses it by its size, before reading it
    with pytest.raises(UnsupportedModel, match=r"larger than 10 bytes \(100 announced\)"):
        read_small(folder.open("big.json"), 10)
    # And a stream that announces nothing is refused once it passes the cap
    with pytest.raises(UnsupportedModel, match=r"larger than 10 bytes$"):
        read_small(Reader(io.BytesIO(b"{" * 100), "stream", UnsupportedModel), 10)
    assert read_small(folder.open("big.json"), 100) == b"{" * 100


def test_a_transport_error_while_reading_is_the_places_error() -> None:
    # Given a stream that breaks off after its headers
    class Broken(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            raise ConnectionResetError("reset by peer")

    # Then reading it raises the place's error, naming the interruption
    with pytest.raises(UnsupportedModel, match="download interrupted"):
        Reader(Broken(), "GET http://x/m", UnsupportedModel).read(10)


def test_a_local_folder_refuses_a_link_and_names_a_missing_file(tmp_path: Path) -> None:
    # Given a folder with a link to a file outside it
    (tmp_path / "outside").write_bytes(b"secret")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    folder = LocalFolder(tmp_path / "root", SharedStorageError)
    # Then the link is refused, not read, and a missing key is the place's error too
    with pytest.raises(SharedStorageError, match="symbolic link"):
        folder.open("link")
    with pytest.raises(SharedStorageError, match="not found at"):
        folder.open("missing")
