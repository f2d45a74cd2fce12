"""The one checker of a task's arguments: each task kind declares them, one function holds a call to them.

A task kind lists its keyword arguments as :class:`Arg` values (a name, a type, bounds, a default, whether it is
required or may be ``null``, the values allowed) in one :class:`TaskArgs`. :func:`check_arguments` refuses
positional arguments, an unknown or missing argument and a value of the wrong type or out of bounds, each with
``InvalidTask`` naming the argument and what was expected: the one error type of an argument a client got wrong.
What an argument *holds* (the rows, texts and images a model reads) is an input, checked by its kind's module
with ``InvalidInput``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypha_celery.errors import InvalidTask

__all__ = ["MISSING", "Arg", "TaskArgs", "check_arguments", "check_value", "check_values"]

TYPES = ("int", "number", "bool", "str", "list", "object", "any")
_SHOWN: dict[int, str] = {2**63 - 1: "2**63 - 1"}  # bounds read better as what they are


class _Missing:
    """No default: an absent argument stays absent (``None`` in the checked values)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Arg:
    """One argument: its ``name`` and ``type`` (one of :data:`TYPES`), and what else it must be.

    ``low``/``high`` bound an ``int`` or ``number`` value (``low_open``/``high_open``: not equal to the bound), and
    the length of a ``str`` or ``list``. ``choices`` are the values allowed; ``pattern`` a ``str`` must match;
    ``items`` checks each element of a ``list``; ``fields`` the keys of an ``object`` (no others allowed).
    ``nullable``: ``null`` means absent. ``note`` ends the expectation (a unit, where the bound comes from).
    """

    name: str
    type: str = "any"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    default: Any = MISSING
    required: bool = False
    nullable: bool = False
    choices: tuple[Any, ...] | None = None
    pattern: re.Pattern[str] | None = None
    items: Arg | None = None
    fields: tuple[Arg, ...] | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"argument {self.name!r}: type {self.type!r} is not one of {', '.join(TYPES)}")

    def expected(self) -> str:
        """What a value must be, in words: ``an integer from 1 to 1024``, ``a number in (0, 10]``."""
        if self.choices is not None:
            words = f"one of {', '.join(repr(c) for c in self.choices)}"
        elif self.type == "int":
            words = "an integer" + self._range("from {} to {}", "at least {}", "at most {}")
        elif self.type == "number":
            words = "a number" + self._interval()
        elif self.type == "bool":
            words = "true or false"
        elif self.type == "str":
            words = ("a non-empty string" if self.low == 1 and self.high is None else
                     "a string" + self._range("of {} to {} characters", "of at least {} characters",
                                              "of at most {} characters"))
        elif self.type == "list":
            of = f" of {_plural(self.items.expected())}" if self.items is not None else ""
            words = ("a non-empty list" if self.low == 1 and self.high is None else
                     "a list" + self._range("of {} to {} items", "of at least {} items", "of at most {} items")) + of
        elif self.type == "object":
            words = "an object" + (f" with {', '.join(f.name for f in self.fields)}" if self.fields else "")
        else:
            words = "given"
        return words + (" or null" if self.nullable else "") + self.note

    def _range(self, both: str, low: str, high: str) -> str:
        shown = [_show(b) if b is not None else None for b in (self.low, self.high)]
        if shown[0] is not None and shown[1] is not None:
            return " " + both.format(*shown)
        if shown[0] is not None:
            return " " + low.format(shown[0])
        return " " + high.format(shown[1]) if shown[1] is not None else ""

    def _interval(self) -> str:
        if self.low is None or self.high is None:
            return self._range("", "above {}" if self.low_open else "of at least {}", "of at most {}")
        return f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class TaskArgs:
    """A task kind's arguments, keyword only: ``args`` as declared, ``one_of`` groups of which exactly one is given.

    ``one_of`` entries are ``(names, described)``: the argument names, and how the refusal lists them
    (``"prompt (a string) or messages (chat turns)"``).
    """

    task: str
    args: tuple[Arg, ...]
    one_of: tuple[tuple[tuple[str, ...], str], ...] = ()

    def names(self) -> list[str]:
        return sorted(arg.name for arg in self.args)


def check_arguments(spec: TaskArgs, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Each argument of ``spec`` checked, defaults filled in (``None`` for an absent one without a default).

    Refuses positional arguments, kwargs that are no object, an unknown or missing argument, a missing or doubled
    ``one_of`` choice and each value ``spec`` does not allow: ``InvalidTask`` naming the argument.
    """
    if args:
        raise InvalidTask(f"{spec.task} takes keyword arguments only ({', '.join(spec.names())}); got {len(args)} "
                          "positional")
    if not isinstance(kwargs, Mapping):
        raise InvalidTask(f"{spec.task} kwargs must be an object")
    known = {arg.name for arg in spec.args}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise InvalidTask(f"{spec.task} got an unknown argument {unknown[0]!r} (it takes {', '.join(spec.names())})")
    missing = sorted(arg.name for arg in spec.args if arg.required and arg.name not in kwargs)
    if missing:
        raise InvalidTask(f"{spec.task} is missing the required argument {missing[0]!r}")
    for names, described in spec.one_of:
        given = [name for name in names if name in kwargs]
        if not given:
            others = "".join(f", or {name!r}" for name in names[1:])
            raise InvalidTask(f"{spec.task} is missing the required argument {names[0]!r}{others}: it takes exactly "
                              f"one of {described}")
        if len(given) > 1:
            raise InvalidTask(f"{spec.task} takes exactly one of {described}, got {', '.join(given)}")
    return check_values(spec.args, kwargs)


def check_values(args: Sequence[Arg], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Each of ``args`` in ``kwargs`` checked (:func:`check_value`), the absent ones at their default (or ``None``);
    other keys in ``kwargs`` are not looked at."""
    return {arg.name: check_value(arg, kwargs[arg.name]) if arg.name in kwargs else
            (None if arg.default is MISSING else arg.default) for arg in args}


def check_value(arg: Arg, value: Any, prefix: str = "") -> Any:
    """``value`` if ``arg`` allows it (an ``object`` with its fields' defaults filled in, a ``list`` copied);
    else ``InvalidTask`` naming ``prefix + arg.name`` and what it must be."""
    name = prefix + arg.name
    if value is None and arg.nullable:
        return None
    if not _fits(arg, value):
        raise InvalidTask(f"{name} must be {arg.expected()}, got {_short(value)}")
    if arg.type == "list" and arg.items is not None:
        return [check_value(arg.items, item, f"{name}[{index}]") for index, item in enumerate(value)]
    if arg.type == "object" and arg.fields is not None:
        return _check_fields(arg.fields, value, name)
    return value


def _check_fields(fields: tuple[Arg, ...], value: Mapping[str, Any], name: str) -> dict[str, Any]:
    """An object's keys: each known and checked, the required ones present; absent ones with a default filled in."""
    known = sorted(f.name for f in fields)
    unknown = sorted(set(value) - set(known), key=str)
    if unknown:
        raise InvalidTask(f"{name} got an unknown setting {unknown[0]!r} (it takes {', '.join(known)})")
    missing = [f.name for f in fields if f.required and f.name not in value]
    if missing:
        raise InvalidTask(f"{name} is missing {missing[0]!r} (it takes {', '.join(known)})")
    checked = {f.name: check_value(f, value[f.name], f"{name}.") for f in fields if f.name in value}
    checked.update({f.name: f.default for f in fields if f.name not in value and f.default is not MISSING})
    return checked


def _fits(arg: Arg, value: Any) -> bool:
    if arg.choices is not None:
        return any(value == choice and type(value) is type(choice) for choice in arg.choices)
    if arg.type == "any":
        return True
    if arg.type == "bool":
        return isinstance(value, bool)
    if arg.type in ("int", "number"):
        if isinstance(value, bool) or not isinstance(value, int if arg.type == "int" else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return _within(arg, value)
    if arg.type == "str":
        return isinstance(value, str) and _within(arg, len(value)) and (
            arg.pattern is None or arg.pattern.match(value) is not None)
    if arg.type == "list":
        return isinstance(value, list) and _within(arg, len(value))
    return isinstance(value, Mapping)


def _within(arg: Arg, value: float) -> bool:
    if arg.low is not None and (value < arg.low or (arg.low_open and value == arg.low)):
        return False
    return arg.high is None or value < arg.high or (value == arg.high and not arg.high_open)


def _show(bound: float) -> str:
    """A bound in the refusal: ``2**63 - 1`` as that, an integer as one, a float as ``%g``."""
    if isinstance(bound, int):
        return _SHOWN.get(bound, str(bound))
    return f"{bound:g}"


def _plural(expected: str) -> str:
    """``a string of ...`` as a list's items: ``strings of ...``."""
    for article in ("a ", "an "):
        if expected.startswith(article):
            expected = expected[len(article):]
            break
    return re.sub(r"\b(integer|number|string|list|object)\b", r"\1s", expected, count=1)


def _short(value: Any) -> str:
    """The value as the refusal quotes it: its repr, cut at 80 characters (an argument may be a megabyte)."""
    shown = repr(value)
    return shown if len(shown) <= 80 else f"{shown[:77]}..."
