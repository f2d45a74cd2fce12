"""Byte sizes as operators write them: ``"8GB"``, ``"512MiB"``, ``"1.5 G"``, ``1048576``; seconds from the environment.

Decimal units are powers of 1000 and binary units powers of 1024 (the IEC
standard): ``GB``/``G`` = 10**9, ``GiB``/``Gi`` = 2**30. Units ignore case, so
unlike Kubernetes quantities ``m`` means mega, never milli.
"""

from __future__ import annotations

import math
import os
import re

__all__ = ["env_seconds", "format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mi": 2**20, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "ti": 2**40, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Return ``value`` in bytes; raise ``ValueError`` saying why it is not a size.

    Zero and negative sizes are refused: every size in the config is a limit
    or a capacity, and a zero limit would refuse everything silently.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '8GB' or a number of bytes, got {value!r}")
    if isinstance(value, int):
        if value > 2**63:
            raise ValueError(f"size {str(value)[:40]}... is beyond any machine")
        number, factor = float(value), 1
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"size must be a finite number, got {value!r}")
        number, factor = value, 1
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            if value.strip().startswith("-"):
                raise ValueError(f"size must be positive, got {value!r}")
            raise ValueError(f"cannot parse size {value!r} (expected e.g. '8GB', '512MiB')")
        unit = match.group(2).lower()
        if unit not in _UNITS:
            raise ValueError(f"unknown size unit {match.group(2)!r} in {value!r} (use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)")
        number, factor = float(match.group(1)), _UNITS[unit]
    else:
        raise ValueError(f"expected a size like '8GB' or a number of bytes, got {type(value).__name__}")
    if not math.isfinite(number * factor) or number * factor > 2**63:
        raise ValueError(f"size {value!r} is beyond any machine")
    size = int(number * factor)
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_DISPLAY = (*_BINARY, ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def format_size(size: int) -> str:
    """Render bytes for people, the one formatter for every size printed: ``23.5 GiB``, ``512 MiB``, ``8 GB``.

    A size that is a whole number (below 1024) of some unit keeps that unit, so a configured
    ``"8GB"`` reads back as ``8 GB``; any other size is shown in the largest binary unit, to one
    decimal. Never a five-digit count of KiB.
    """
    sign, size = ("-" if size < 0 else ""), abs(int(size))
    if size < 1024:
        return f"{sign}{size} B"
    exact = [f"{size // factor} {unit}" for unit, factor in _DISPLAY
             if size % factor == 0 and size // factor < 1024]
    if exact:
        return sign + min(exact, key=len)
    for unit, factor in _BINARY:
        if size >= factor:
            return f"{sign}{size / factor:.1f} {unit}"
    return f"{sign}{size} B"  # unreachable: size >= 1024 here


def env_seconds(name: str, high: float) -> float:
    """Seconds from the environment variable ``name``: 0 when it is unset, not a number, or outside [0, ``high``]
    (the test hooks that slow a worker down on demand read theirs so: a bad value never slows anyone)."""
    try:
        value = float(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0.0
    return value if 0 <= value <= high else 0.0
