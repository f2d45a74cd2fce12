"""Read files someone else's folder holds without following links: regular files only, copies under a byte budget.

A model folder (a clone, a download, a shared mount) is someone else's. A
symbolic link in it names any file of the host (``tokenizer.json ->
~/.ssh/id_ed25519``), and a FIFO or a device blocks a reader or never ends. So
:func:`walk` ``lstat``-s every entry and refuses anything that is neither a
folder nor a regular file; :func:`open_regular` opens each path component
with ``O_NOFOLLOW`` from its parent's descriptor (a link swapped in after the
check fails to open) and ``O_NONBLOCK`` (a FIFO opens without waiting for a
writer), then ``fstat``-s the descriptor: it must be a regular file. A
hard link is a second name of a file that may live anywhere on the same
filesystem (a mode-0600 key linked in as ``tokenizer.json``), and nothing in
the folder says where the other name is: so a regular file with more than one
link is refused too, by both.
:func:`copy_capped` counts the bytes it copies and stops at its budget, so a
file that grew after it was measured never fills the disk. The folder itself
may be reached through a link: the operator named it. :func:`sha256_file`
hashes a file the store wrote itself (a staged copy, a stored model's file).

Every format's import reads its source through here, and so do the store's
sources and shared storage: it sits with the formats, below ``models/``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypha_celery.errors import HyphaError, UnsupportedModel

__all__ = ["Copied", "Walked", "copy_capped", "open_regular", "sha256_file", "walk"]

_CHUNK = 1 << 20
_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
Refuse = Callable[[str], HyphaError]


@dataclass(frozen=True)
class Walked:
    """A folder's regular files (relative path: size from ``lstat``), and the skipped folders (``a/.git/``)."""

    files: dict[str, int]
    skipped: list[str]


def walk(directory: Path, *, skip: frozenset[str] = frozenset(), refuse: Refuse = UnsupportedModel) -> Walked:
    """Every regular file under ``directory``, by its ``/``-separated relative path.

    Folders named in ``skip`` (``.git``) are neither entered nor checked. A symbolic link (to a file or a
    folder), a FIFO, a socket, a device or a file with more than one hard link anywhere raises ``refuse``
    naming every such entry.
    """
    files: dict[str, int] = {}
    skipped: list[str] = []
    refused: list[str] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        try:
            names = sorted(os.listdir(directory / relative if relative else directory))
        except OSError as exc:
            raise refuse(f"{directory / relative}: cannot list ({exc.strerror})") from None
        for name in names:
            path = f"{relative}/{name}" if relative else name
            try:
                found = os.lstat(directory / path)
            except OSError as exc:
                raise refuse(f"{directory / path}: cannot stat ({exc.strerror})") from None
            if stat.S_ISDIR(found.st_mode):
                if name in skip:
                    skipped.append(f"{path}/")
                else:
                    pending.append(path)
            elif stat.S_ISREG(found.st_mode) and found.st_nlink > 1:
                refused.append(f"{path} {_hard_links(found.st_nlink)}")
            elif stat.S_ISREG(found.st_mode):
                files[path] = found.st_size
            else:
                refused.append(f"{path} {_what(found.st_mode)}")
    if refused:
        raise refuse(f"{directory}: refused: " + "; ".join(sorted(refused)) + " (only regular files and folders "
                     "are read from a model folder: copy the files the links point to, e.g. cp -rL, and copy a "
                     "hard-linked file so that the copy is its own)")
    return Walked(dict(sorted(files.items())), sorted(skipped))


def open_regular(root: Path, relative: str, *, refuse: Refuse = UnsupportedModel) -> int:
    """A read-only descriptor of the regular file ``root/relative``, opened without following any link below ``root``.

    ``relative`` is ``/``-separated names (no ``..``, no absolute path, no backslash). A missing file
    raises ``FileNotFoundError``; a link, a non-regular or hard-linked file or a bad name raises ``refuse``.
    """
    parts = relative.split("/")
    if relative.startswith("/") or "\\" in relative or any(part in ("", ".", "..") for part in parts):
        raise refuse(f"{relative!r} is not a path inside the folder")
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = os.open(part, _NOFOLLOW | os.O_DIRECTORY, dir_fd=folder)
            os.close(folder)
            folder = inner
        descriptor = os.open(parts[-1], _NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise refuse(f"{root / relative} is a symbolic link or lies under one: refused") from None
        raise
    finally:
        os.close(folder)
    found = os.fstat(descriptor)
    if not stat.S_ISREG(found.st_mode) or found.st_nlink > 1:
        os.close(descriptor)
        what = _what(found.st_mode) if not stat.S_ISREG(found.st_mode) else _hard_links(found.st_nlink)
        raise refuse(f"{root / relative} {what}: refused")
    os.set_blocking(descriptor, True)
    return descriptor


@dataclass(frozen=True)
class Copied:
    """What :func:`copy_capped` wrote: the sha256 of the bytes and their number."""

    sha256: str
    size: int


def copy_capped(descriptor: int, target: Path, budget: int, what: str, *, refuse: Refuse = UnsupportedModel) -> Copied:
    """Copy the open ``descriptor`` (closed here) to the new file ``target``, at most ``budget`` bytes.

    One byte more raises ``refuse`` before it is written: whoever made ``target`` removes it (a staging folder).
    """
    digest, written = hashlib.sha256(), 0
    with os.fdopen(descriptor, "rb") as source, \
            open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644),
                 "wb") as out:
        while chunk := source.read(min(_CHUNK, budget - written + 1)):
            written += len(chunk)
            if written > budget:
                raise refuse(f"{what}: grew past max_model_size while it was copied ({budget} bytes left); refused")
            digest.update(chunk)
            out.write(chunk)
    return Copied(digest.hexdigest(), written)


def _hard_links(count: int) -> str:
    return f"has {count} hard links (another name of a file that may lie outside the folder: copy it)"


def _what(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_ISFIFO(mode):
        return "is a FIFO"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    return "is not a regular file"


def sha256_file(path: Path) -> str:
    """The sha256 of a file the store itself wrote or holds (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
