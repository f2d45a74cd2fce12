"""A row's decoded text: where a stop string ends it, and what of it a client may already see.

Stop strings are matched on decoded text, not on token ids, because one string
can span tokens and one token can hold several strings; the text is cut at the
first stop. What is streamed is always a prefix of the final text (see :func:`visible`).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["cut_at_stop", "visible"]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found."""
    cuts = [text.find(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def visible(text: str, stop: Sequence[str]) -> str:
    """What a client may see of unfinished text: a prefix of whatever the final text will be.

    Cut at a stop string, hold back a tail that may become one, and drop a trailing
    replacement character (a multi-byte character whose bytes are still arriving).
    """
    text, stopped = cut_at_stop(text, stop)
    if stopped:
        return text
    hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[:len(text) - hold].rstrip("\ufffd")
