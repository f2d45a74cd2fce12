"""Text a tokenizer may be handed: Unicode scalar values only, and a byte bound per model.

A tokenizer is native code that trusts its input. A lone surrogate (JSON can
carry ``"\\ud800"``; Python decodes it into a ``str``) cannot cross into Rust,
so it fails deep inside the library; a text of a few megabytes makes the fast
tokenizers allocate about a hundred bytes per character, and under the task's
``RLIMIT_AS`` the failed allocation aborts the whole executor (Rust's
allocation-error handler calls ``abort``), taking every cached model with it.
Both are refused here, by name and position, before any tokenizer runs: in
validation (before anything is reserved) and again in the executor.

The bound is per model: :data:`BYTES_PER_TOKEN` bytes for each token of the
model's maximum length plus :data:`SLACK_BYTES`, or :data:`UNKNOWN_LENGTH_BYTES`
when the length is not known; a worker's ``[worker.security] max_text_bytes``
replaces it for every model. Sixteen bytes a token is about four times what
English (~4 bytes a token) or CJK text (~3-6) takes, so a text that fits the
model (or one that truncation would cut to it) passes, while the tokenizer's
work stays proportional to what the model can read.

Imports nothing but the error tree: the worker's validation and the executor's
runtimes both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hypha_celery.errors import InvalidInput

__all__ = ["BYTES_PER_TOKEN", "SLACK_BYTES", "UNKNOWN_LENGTH_BYTES", "TextBound", "check_text", "check_texts",
           "text_byte_limit", "unicode_error"]

BYTES_PER_TOKEN = 16
SLACK_BYTES = 4096
# A model whose maximum length is unknown (or not read yet: fetched after admission): 1 MiB, which a fast
# tokenizer turns into about 150 MB of work, inside the smallest "auto" reservation's runtime floor.
UNKNOWN_LENGTH_BYTES = 2**20


def text_byte_limit(max_length: int | None, override: int | None = None) -> int:
    """The most UTF-8 bytes one text may have for a model of ``max_length`` tokens (``override``: the worker's)."""
    if override is not None:
        return override
    if not max_length:
        return UNKNOWN_LENGTH_BYTES
    return max_length * BYTES_PER_TOKEN + SLACK_BYTES


@dataclass(frozen=True)
class TextBound:
    """The most UTF-8 bytes a text may have, and where that figure comes from (for the error message)."""

    limit: int
    why: str

    @classmethod
    def of(cls, model: str | None, max_length: int | None, override: int | None) -> TextBound:
        """The bound for ``model`` (None: not known yet, the worker-wide bound) of ``max_length`` tokens."""
        if override is not None:
            why = "[worker.security] max_text_bytes"
        elif model is None:
            why = "the bound for a model not read yet"
        elif not max_length:
            why = f"model {model!r} states no maximum length"
        else:
            why = f"model {model!r} reads at most {max_length} tokens: {BYTES_PER_TOKEN} bytes a token plus {SLACK_BYTES}"
        return cls(text_byte_limit(max_length, override), why)


def unicode_error(text: str, what: str) -> InvalidInput | None:
    """``InvalidInput`` naming ``what`` and the character position when ``text`` holds a surrogate, else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return InvalidInput(f"{what} is not valid Unicode: character {exc.start} is a lone surrogate "
                            f"(U+{ord(text[exc.start]):04X}); send text of Unicode scalar values only")
    return None


def check_text(text: str, what: str, bound: TextBound | None = None) -> int:
    """Refuse ``text`` (``InvalidInput`` naming ``what``) if it is not valid Unicode or over ``bound``.

    Returns its UTF-8 size.
    """
    error = unicode_error(text, what)
    if error is not None:
        raise error
    size = len(text.encode("utf-8"))
    if bound is not None and size > bound.limit:
        raise InvalidInput(f"{what} is {size} bytes, above the {bound.limit} bytes a text may have here "
                           f"({bound.why}): send less")
    return size


def check_texts(texts: Sequence[str], what: str, bound: TextBound | None = None) -> int:
    """:func:`check_text` for each of ``texts`` (named ``what[i]``); returns their total UTF-8 size."""
    return sum(check_text(text, f"{what}[{index}]", bound) for index, text in enumerate(texts))
