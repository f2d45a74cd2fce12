"""hypha.generate with response_format through a real worker: valid JSON from a random-weight model, and an
output that cannot satisfy its schema failing with InvalidOutput, never SUCCESS."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from bench.structured import CORPUS, PROMPT, response_format
from hypha_celery.models.examples import TINY_LLAMA

SMALL = {"cpu_cores": 1, "memory": "1GB"}


def _send(app: Any, **kwargs: object) -> Any:
    return app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "requirements": SMALL, "prompt": PROMPT,
                                                   **kwargs})


def test_json_schema_requests_through_the_worker_return_valid_json(start_worker, celery_client) -> None:
    # Given a worker with the tiny Llama (random weights: only the constraint can make its output valid)
    start_worker()
    app = celery_client()
    _send(app, max_new_tokens=2).get(timeout=300)  # the executor loads the model first: the tasks below time their run
    names = ("nested", "array_bounds", "number_bounds", "pattern")
    # When a few corpus schemas are asked for, greedy and sampled, concurrently (they may share a batch)
    pending = [(name, _send(app, max_new_tokens=160, response_format=response_format(name, CORPUS[name]),
                            **({"do_sample": True, "seed": 5} if i % 2 else {})))
               for i, name in enumerate(names)]
    pending.append(("json_object", _send(app, max_new_tokens=160, response_format={"type": "json_object"})))
    # Then each task succeeds with text that validates against its schema, ended by its grammar (stop)
    for name, task in pending:
        output = task.get(timeout=300)["output"]
        value = json.loads(output["text"])
        if name == "json_object":
            assert isinstance(value, dict)
        else:
            jsonschema.validate(value, CORPUS[name])
        assert output["finish_reason"] == "stop", (name, output)


def test_an_output_that_cannot_complete_its_schema_fails_with_invalid_output(start_worker, celery_client) -> None:
    # Given a worker, When a schema needs more tokens than max_new_tokens allows
    start_worker()
    task = _send(celery_client(), max_new_tokens=3, response_format=response_format("nested", CORPUS["nested"]))
    # Then the task fails with InvalidOutput (the JSON was cut), never SUCCESS with invalid JSON
    with pytest.raises(Exception) as caught:
        task.get(timeout=300)
    assert type(caught.value).__name__ == "InvalidOutput" and "max_new_tokens" in str(caught.value)
    assert task.state == "FAILURE"


def test_an_unsupported_schema_is_refused_naming_the_keyword(start_worker, celery_client) -> None:
    start_worker()
    task = _send(celery_client(), response_format=response_format("u", {"type": "array", "uniqueItems": True}))
    with pytest.raises(Exception) as caught:
        task.get(timeout=300)
    assert type(caught.value).__name__ == "InvalidTask" and "uniqueItems" in str(caught.value)
