"""Bearer API keys: the file format, and checking a request's ``Authorization`` header against it.

The file holds one key a line, either the key itself or ``sha256:<64 hex digits>`` of
it, so the file need not hold secrets; blank lines and lines starting with ``#`` are
skipped. Keys are held as their SHA-256 digests and compared in constant time; a
key's digest (hex) is also its identity for rate limiting, so Redis never sees a key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable

from hypha_celery.errors import ConfigError

__all__ = ["ApiKeys", "digest"]

_SHA256 = re.compile(r"sha256:([0-9a-fA-F]{64})")


def digest(key: str) -> str:
    """The hex SHA-256 of a key: how the file may name it, and its identity for rate limiting."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeys:
    """The accepted keys, as digests."""

    def __init__(self, digests: Iterable[str]) -> None:
        self.digests = tuple(sorted({d.lower() for d in digests}))

    @classmethod
    def parse(cls, text: str, source: str = "api keys") -> ApiKeys:
        """Keys from a file's text; ``ConfigError`` naming the line for a malformed ``sha256:`` entry or a key with
        whitespace inside, and for a file with no key at all (a gateway that accepts nobody is a mistake)."""
        found: list[str] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("sha256:"):
                match = _SHA256.fullmatch(line)
                if match is None:
                    raise ConfigError(f"{source}:{number}", "a sha256: entry must be 64 hex digits")
                found.append(match.group(1))
            elif any(c.isspace() for c in line):
                raise ConfigError(f"{source}:{number}", "a key must not contain whitespace")
            else:
                found.append(digest(line))
        if not found:
            raise ConfigError(source, "holds no key")
        return cls(found)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ApiKeys:
        """Keys from a file (``ConfigError`` naming it when it cannot be read)."""
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(str(path), f"cannot read the API keys file: {exc}") from None
        return cls.parse(text, str(path))

    def identify(self, authorization: str | None) -> str | None:
        """The digest of the key in an ``Authorization: Bearer <key>`` header when the file accepts it, else None."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        wanted = digest(key)
        accepted = False
        for known in self.digests:  # every entry compared, in constant time each: no early exit to time
            accepted |= hmac.compare_digest(known, wanted)
        return wanted if accepted else None
