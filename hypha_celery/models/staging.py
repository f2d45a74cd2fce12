"""Where the store assembles its entries: per-model locks, staging folders, and the sweep of dead ones.

A staging folder (``.incoming-<id>-XXXXXXXX``) is made, filled and renamed
into place only while its model's lock (``<root>/.locks/<id>.lock``, an
``flock``) is held, and removed on any failure. A process killed outright
runs no ``finally``: its folder stays, and since its lock died with it,
:func:`sweep` knows it for a dead one by taking that lock without waiting.
A live import in another process holds its lock, so its folder is kept.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypha_celery.manifest import is_model_id

__all__ = ["INCOMING", "LOCKS", "folder", "lock", "sweep", "try_lock"]

INCOMING = ".incoming"  # a sandboxed training executor's staging folder (executor.landlock.STAGING)
LOCKS = ".locks"  # executor.landlock.LOCKS
_LEFTOVER = re.compile(r"^\.incoming-(?P<id>.+)-[a-z0-9_]{8}\Z")  # tempfile.mkdtemp's 8 characters


@contextmanager
def lock(root: Path, model_id: str) -> Iterator[None]:
    """Hold ``model_id``'s lock, waiting for it."""
    (root / LOCKS).mkdir(parents=True, exist_ok=True)
    with open(root / LOCKS / f"{model_id}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def try_lock(root: Path, model_id: str) -> Iterator[bool]:
    """The model's lock if nobody holds it (True), else False at once; False too where locks cannot be written."""
    try:
        (root / LOCKS).mkdir(parents=True, exist_ok=True)
        handle = open(root / LOCKS / f"{model_id}.lock", "w")
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sweep(root: Path, staging: Path, holding: str | None = None) -> None:
    """Remove the staging folders, in ``staging`` and ``root/.incoming``, of imports, fetches and saves that died.

    ``holding``: the model whose lock the caller holds already (its leftovers are a dead process's too).
    """
    for place in dict.fromkeys((staging, root / INCOMING)):
        try:
            entries = sorted(place.iterdir())
        except OSError:
            continue
        for entry in entries:
            match = _LEFTOVER.match(entry.name)
            if match is None or not is_model_id(match["id"]):
                continue
            if match["id"] == holding:
                shutil.rmtree(entry, ignore_errors=True)
                continue
            with try_lock(root, match["id"]) as free:
                if free:
                    shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def folder(root: Path, staging: Path, model_id: str) -> Iterator[Path]:
    """A fresh staging folder for ``model_id`` (whose lock the caller holds), removed on any failure."""
    staging.mkdir(parents=True, exist_ok=True)
    sweep(root, staging, holding=model_id)
    made = Path(tempfile.mkdtemp(prefix=f".incoming-{model_id}-", dir=staging))
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)
