"""The Lua scripts behind the ledger, placement and registry (files in ``hypha_celery/lua``).

One convention for every script: it begins with a header that names its
``KEYS`` and ``ARGV`` and binds each to an upper-case local
(``local FREE_MEMORY = KEYS[5]``); below the header no ``KEYS[...]`` or
``ARGV[...]`` appears. A variable-length tail is bound with ``tail(KEYS, n)``.
Every key name comes from :mod:`hypha_celery.keys` in the order the header
lists (the ledger scripts share the header of ``prelude.lua``);
``tests/unit/test_keys.py`` checks that the two agree.

Sources are read once per process; a script is sent to a Redis server once
(``SCRIPT LOAD`` when ``EVALSHA`` finds the server without it), and after that
only its SHA travels.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError

__all__ = ["Script", "script", "source"]


@functools.cache  # package data never changes while the process runs: read each file once
def source(name: str, *, prelude: bool = False) -> str:
    """The text of ``lua/<name>.lua``, after the ledger prelude when ``prelude``."""
    folder = resources.files("hypha_celery").joinpath("lua")
    text = folder.joinpath(f"{name}.lua").read_text()
    return folder.joinpath("prelude.lua").read_text() + "\n" + text if prelude else text


@dataclass(frozen=True)
class Script:
    """One Lua script, runnable on any client: by SHA, loading it into a server that lacks it."""

    name: str
    text: str
    sha: str

    def __call__(self, client: redis.Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a new or restarted server: load it once, then run it by SHA again
            client.script_load(self.text)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: redis.client.Pipeline, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Add a run of this script to ``pipe``, to travel with the pipeline's other commands in one round trip.

        Its reply is a ``NoScriptError`` in the pipeline's results when that server has not loaded it yet.
        """
        pipe.evalsha(self.sha, len(keys), *keys, *args)


@functools.cache  # one immutable Script per file for the whole process, shared by every client
def script(name: str, *, prelude: bool = False) -> Script:
    """``lua/<name>.lua`` (after the ledger prelude when ``prelude``), ready to run."""
    text = source(name, prelude=prelude)
    return Script(name=name, text=text, sha=hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest())
