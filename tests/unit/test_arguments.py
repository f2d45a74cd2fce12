"""The one argument checker: a task kind's declared arguments, each refusal an InvalidTask naming the argument."""

from __future__ import annotations

import re
from typing import Any

import pytest

from hypha_celery.errors import InvalidTask
from hypha_celery.stages.validation.arguments import Arg, TaskArgs, check_arguments, check_value

SPEC = TaskArgs("hypha.example", (
    Arg("model", required=True),
    Arg("count", "int", 1, 10, default=3),
    Arg("rate", "number", 0, 1, low_open=True, default=0.5),
    Arg("share", "number", 0, 1, high_open=True, default=0.0),
    Arg("seed", "int", 0, 2**63 - 1, nullable=True),
    Arg("flag", "bool", default=False),
    Arg("name", "str", low=1, high=8),
    Arg("mode", choices=("full", "lora"), default="full"),
    Arg("tags", "list", high=2, items=Arg("", "str", low=1)),
    Arg("opts", "object", fields=(Arg("r", "int", 1, 4, default=2), Arg("key", "str", required=True))),
    Arg("prompt", "str"),
    Arg("messages", "list"),
), one_of=((("prompt", "messages"), "prompt or messages"),))


def _check(**kwargs: Any) -> dict[str, Any]:
    return check_arguments(SPEC, (), {"model": "m", "prompt": "hi", **kwargs})


def _refused(**kwargs: Any) -> str:
    with pytest.raises(InvalidTask) as caught:
        _check(**kwargs)
    assert type(caught.value) is InvalidTask  # the one argument error, not a subclass of it
    return str(caught.value)


def test_absent_arguments_take_their_defaults() -> None:
    # Given only the required arguments
    values = _check()
    # Then each declared argument is there: its default, or None without one
    assert values == {"model": "m", "count": 3, "rate": 0.5, "share": 0.0, "seed": None, "flag": False, "name": None,
                      "mode": "full", "tags": None, "opts": None, "prompt": "hi", "messages": None}


def test_values_within_their_bounds_pass_as_given() -> None:
    values = _check(count=10, rate=1, share=0, seed=2**63 - 1, flag=True, name="abcdefgh", mode="lora", tags=["a"],
                    opts={"key": "k"})
    assert values["count"] == 10 and values["rate"] == 1 and values["share"] == 0 and values["seed"] == 2**63 - 1
    assert values["flag"] is True and values["name"] == "abcdefgh" and values["mode"] == "lora"
    # an object's absent fields take their defaults
    assert values["tags"] == ["a"] and values["opts"] == {"key": "k", "r": 2}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"count": 0}, "count must be an integer from 1 to 10, got 0"),
    ({"count": 11}, "count must be an integer from 1 to 10, got 11"),
    ({"rate": 0}, "rate must be a number in (0, 1], got 0"),
    ({"rate": 1.5}, "rate must be a number in (0, 1], got 1.5"),
    ({"share": 1}, "share must be a number in [0, 1), got 1"),
    ({"share": -0.1}, "share must be a number in [0, 1), got -0.1"),
    ({"seed": -1}, "seed must be an integer from 0 to 2**63 - 1 or null, got -1"),
    ({"seed": 2**63}, "seed must be an integer from 0 to 2**63 - 1 or null"),
    ({"name": ""}, "name must be a string of 1 to 8 characters, got ''"),
    ({"name": "abcdefghi"}, "name must be a string of 1 to 8 characters"),
    ({"tags": ["a", "b", "c"]}, "tags must be a list of at most 2 items of non-empty strings"),
    ({"opts": {"key": "k", "r": 5}}, "opts.r must be an integer from 1 to 4, got 5"),
])
def test_each_bound_is_held(kwargs: dict[str, Any], message: str) -> None:
    # Given one value just past a bound, Then the refusal names the argument, the bound and the value
    assert message in _refused(**kwargs)


@pytest.mark.parametrize(("kwargs", "named", "expected"), [
    ({"count": "5"}, "count", "an integer"),
    ({"count": 2.0}, "count", "an integer"),
    ({"count": True}, "count", "an integer"),  # a bool is no integer here
    ({"rate": "0.5"}, "rate", "a number"),
    ({"rate": float("nan")}, "rate", "a number"),
    ({"rate": float("inf")}, "rate", "a number"),
    ({"rate": False}, "rate", "a number"),
    ({"flag": 1}, "flag", "true or false"),
    ({"flag": "yes"}, "flag", "true or false"),
    ({"name": 3}, "name", "a string"),
    ({"mode": "qlora"}, "mode", "one of 'full', 'lora'"),
    ({"tags": "a"}, "tags", "a list"),
    ({"tags": [""]}, "tags[0]", "a non-empty string"),
    ({"tags": ["a", 2]}, "tags[1]", "a non-empty string"),
    ({"opts": []}, "opts", "an object with r, key"),
    ({"opts": {"r": 1}}, "opts", "missing 'key'"),
    ({"opts": {"key": "k", "rank": 1}}, "opts", "unknown setting 'rank'"),
    ({"seed": None, "count": None}, "count", "an integer"),  # null only where the argument allows it
])
def test_a_wrong_type_is_refused_naming_the_argument(kwargs: dict[str, Any], named: str, expected: str) -> None:
    message = _refused(**kwargs)
    assert re.match(rf"{re.escape(named)} (must be|got|is missing)", message), message
    assert expected in message


def test_an_unknown_keyword_is_refused_with_what_the_task_takes() -> None:
    message = _refused(temperature=0.7)
    assert "hypha.example got an unknown argument 'temperature'" in message
    assert "it takes count, flag, messages, mode, model, name, opts, prompt, rate, seed, share, tags" in message


def test_a_missing_required_argument_is_named() -> None:
    with pytest.raises(InvalidTask, match=r"hypha\.example is missing the required argument 'model'"):
        check_arguments(SPEC, (), {"prompt": "hi"})


def test_exactly_one_of_a_group_is_required() -> None:
    # Given neither prompt nor messages, then both
    with pytest.raises(InvalidTask, match="missing the required argument 'prompt', or 'messages'"):
        check_arguments(SPEC, (), {"model": "m"})
    with pytest.raises(InvalidTask, match="takes exactly one of prompt or messages, got prompt, messages"):
        check_arguments(SPEC, (), {"model": "m", "prompt": "hi", "messages": []})


def test_positional_arguments_and_a_non_object_are_refused() -> None:
    with pytest.raises(InvalidTask, match=r"hypha\.example takes keyword arguments only .*; got 2 positional"):
        check_arguments(SPEC, ("m", 1), {})
    with pytest.raises(InvalidTask, match=r"hypha\.example kwargs must be an object"):
        check_arguments(SPEC, (), ["m"])  # type: ignore[arg-type]


def test_a_long_value_is_cut_in_the_refusal() -> None:
    message = _refused(name="x" * 10_000)
    assert len(message) < 200 and message.endswith("...")


def test_check_value_names_a_nested_argument_with_its_prefix() -> None:
    with pytest.raises(InvalidTask, match=r"^lora\.r must be an integer from 1 to 4, got 0$"):
        check_value(Arg("r", "int", 1, 4), 0, "lora.")


def test_an_unknown_type_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="type 'float' is not one of"):
        Arg("x", "float")
