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
only its SHA travels. :func:`composed` runs two scripts as one (one call, one
atomic step), each on its own ``KEYS`` and ``ARGV``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["Script", "composed", "composed_args", "replies", "script", "source"]


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

    @classmethod
    def of(cls, name: str, text: str) -> Script:
        """A script from its text (its SHA is Redis' name for it)."""
        return cls(name=name, text=text, sha=hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest())

    def __call__(self, client: redis.Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a new or restarted server: load it once, then run it by SHA again
            client.script_load(self.text)
            return client.evalsha(self.sha, len(keys), *keys, *args)


@functools.cache  # one immutable Script per file for the whole process, shared by every client
def script(name: str, *, prelude: bool = False) -> Script:
    """``lua/<name>.lua`` (after the ledger prelude when ``prelude``), ready to run."""
    return Script.of(name, source(name, prelude=prelude))


# Each part runs as a function whose parameters shadow the KEYS and ARGV globals, so its text is used as it is
# (its top-level ``return`` returns from the function). pcall keeps the second part running when the first
# fails, as a MULTI would; nil becomes false so that it cannot cut the reply array short.
_COMPOSED = """\
-- {first} then {then}, as one script (hypha_celery.lua.composed).
-- ARGV: 1 how many KEYS are {first}'s, 2 how many ARGV are {first}'s, then {first}'s ARGV, then {then}'s.
-- Returns {{ok, reply, ok, reply}}: ok 1 and the part's reply, or ok 0 and its error text, for each part.
local function first(KEYS, ARGV)
{first_text}
end
local function second(KEYS, ARGV)
{then_text}
end
local FIRST_KEYS, FIRST_ARGS = tonumber(ARGV[1]), tonumber(ARGV[2])
local keys1, args1, keys2, args2 = {{}}, {{}}, {{}}, {{}}
for i = 1, #KEYS do
  if i <= FIRST_KEYS then keys1[#keys1 + 1] = KEYS[i] else keys2[#keys2 + 1] = KEYS[i] end
end
for i = 3, #ARGV do
  if i - 2 <= FIRST_ARGS then args1[#args1 + 1] = ARGV[i] else args2[#args2 + 1] = ARGV[i] end
end
local function run(part, keys, args)
  local ok, reply = pcall(part, keys, args)
  if type(reply) == 'table' and reply.err then return 0, reply.err end
  if not ok then return 0, tostring(reply) end
  if reply == nil then reply = false end
  return 1, reply
end
local ok1, reply1 = run(first, keys1, args1)
local ok2, reply2 = run(second, keys2, args2)
return {{ok1, reply1, ok2, reply2}}
"""


@functools.cache  # one per pair of scripts for the whole process
def composed(first: Script, then: Script) -> Script:
    """``first`` and then ``then`` as one script: what a ``MULTI`` of the two does, in one call and fewer steps.

    Run it with :func:`composed_args` around the two parts' keys and arguments; its reply is ``[ok, reply, ok, reply]``
    (see :func:`replies`). The second part runs also when the first fails, and neither undoes the other.
    """
    text = _COMPOSED.format(first=first.name, then=then.name, first_text=first.text, then_text=then.text)
    return Script.of(f"{first.name}+{then.name}", text)


def composed_args(first_keys: Sequence[str], first_args: Sequence[Any], then_keys: Sequence[str],
                  then_args: Sequence[Any]) -> tuple[list[str], list[Any]]:
    """The ``KEYS`` and ``ARGV`` of a :func:`composed` script from each part's own."""
    return [*first_keys, *then_keys], [len(first_keys), len(first_args), *first_args, *then_args]


def replies(reply: Sequence[Any]) -> tuple[Any, Any]:
    """Each part's reply from a :func:`composed` script's, a part that failed as a ``ResponseError``."""
    ok1, first, ok2, then = reply
    return (first if ok1 else ResponseError(_text(first))), (then if ok2 else ResponseError(_text(then)))


def _text(error: Any) -> str:
    return error.decode(errors="replace") if isinstance(error, bytes) else str(error)
