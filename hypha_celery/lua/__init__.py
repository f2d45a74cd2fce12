"""The Lua scripts behind the ledger, placement and registry (files in ``hypha_celery/lua``)."""

from __future__ import annotations

from importlib import resources

__all__ = ["source"]


def source(name: str, *, prelude: bool = False) -> str:
    """The text of ``lua/<name>.lua``, after the ledger prelude when ``prelude``."""
    folder = resources.files("hypha_celery").joinpath("lua")
    text = folder.joinpath(f"{name}.lua").read_text()
    return folder.joinpath("prelude.lua").read_text() + "\n" + text if prelude else text
