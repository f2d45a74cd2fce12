"""Continuous batching through a real worker: requests join the executor's running batch and leave it alone.

A real worker, a real (embedded) Redis and the tiny Llama built offline. What the
serving executor's decode loop (:mod:`hypha_celery.executor.continuous`) must keep:
a short request sent while a long one generates finishes first; rows with different
settings share the batch and each gives what it gives alone; stop strings apply per
row; a request the executor refuses fails alone. No wall-clock thresholds: the order
of completion and the texts are what is checked.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hypha_celery.errors import InvalidInput
from hypha_celery.models.examples import TINY_LLAMA
from tests.e2e.test_generate_e2e import PROMPT, _in_process

# A fraction of a core: many requests are admitted at once on a 2-core machine (a whole core each would
# let two in), so they meet in the executor's running batch.
SHARED = {"cpu_cores": 0.1, "memory": "300MB"}


def _send(app: Any, **kwargs: object) -> Any:
    return app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "requirements": SHARED, **kwargs})


def _wait_for_progress(result: Any, timeout: float = 120.0) -> None:
    """Until ``result``'s task reports its first text (it is decoding in the executor)."""
    deadline = time.monotonic() + timeout
    while result.state != "PROGRESS":
        assert not result.ready(), result.get()
        assert time.monotonic() < deadline, "the long generation never started"
        time.sleep(0.05)


def test_a_short_request_joins_a_running_long_one_and_finishes_first(start_worker, celery_client,
                                                                      model_dir: Path) -> None:
    # Given a worker whose executor is generating 240 tokens for a long request
    start_worker({"max_concurrent_tasks": 4})
    app = celery_client()
    long = _send(app, prompt="Once upon a time", max_new_tokens=240)
    _wait_for_progress(long)
    # When a short greedy request arrives meanwhile
    short = _send(app, prompt=PROMPT, max_new_tokens=8).get(timeout=120)
    # Then it finished while the long one still ran, it shared the batch, and its text is its text alone
    assert not long.ready()
    assert short["metrics"]["batch_size"] >= 2
    assert short["output"]["text"] == _in_process(model_dir, PROMPT, 8)[0]
    done = long.get(timeout=300)
    assert done["output"]["usage"]["completion_tokens"] == 240
    assert done["output"]["text"] == _in_process(model_dir, "Once upon a time", 240)[0]


def test_mixed_settings_stop_strings_and_a_refused_row_share_the_batch(start_worker, celery_client,
                                                                        model_dir: Path) -> None:
    # Given a worker, and the greedy texts of two prompts alone (one to place a stop string in)
    start_worker({"max_concurrent_tasks": 6})
    app = celery_client()
    greedy_text = _in_process(model_dir, PROMPT, 16)[0]
    stop_prompt = "A dog"
    stop_full = _in_process(model_dir, stop_prompt, 24)[0]
    stop = next(stop_full[i:i + 2] for i in range(len(stop_full) // 3, len(stop_full) - 2)
                if stop_full[i:i + 2].isprintable() and stop_full[i:i + 2].strip() and "\ufffd" not in stop_full[i:i + 2])
    sampled = {"prompt": "The sun", "max_new_tokens": 20, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
               "top_k": 20, "repetition_penalty": 1.2, "seed": 11}
    long = _send(app, prompt="Once upon a time", max_new_tokens=200)  # keeps the batch running throughout
    _wait_for_progress(long)
    # When a greedy row, a seeded sampled row, a row with a stop string and one the executor refuses
    # (its prompt plus max_new_tokens exceed the model's 512 positions) arrive while it runs
    sent = {
        "greedy": _send(app, prompt=PROMPT, max_new_tokens=16),
        "sampled": _send(app, **sampled),
        "stop": _send(app, prompt=stop_prompt, max_new_tokens=24, stop=[stop]),
        "bad": _send(app, prompt=PROMPT, max_new_tokens=512),
    }
    # Then the refused one fails alone, by name ...
    try:
        sent["bad"].get(timeout=120)
        raise AssertionError("a request past the model's length was served")
    except InvalidInput as exc:
        assert "maximum length" in str(exc)
    results = {name: result.get(timeout=300) for name, result in sent.items() if name != "bad"}
    # ... the greedy row gives its text alone, in a shared batch
    assert results["greedy"]["output"]["text"] == greedy_text
    assert max(result["metrics"]["batch_size"] for result in results.values()) >= 2
    # ... the stop row is cut before its stop string, and ended for it
    stopped = results["stop"]["output"]
    assert stopped["text"] == stop_full[:stop_full.find(stop)] and stopped["finish_reason"] == "stop"
    # ... and the seeded sampled row repeats its text when it runs with nothing beside it
    assert long.get(timeout=300)["output"]["usage"]["completion_tokens"] == 200
    alone = _send(app, **sampled).get(timeout=120)
    assert alone["metrics"]["batch_size"] == 1
    assert alone["output"]["text"] == results["sampled"]["output"]["text"]


def test_static_batching_stays_available(start_worker, celery_client, model_dir: Path) -> None:
    # Given a worker configured for static batches
    start_worker({"generation": {"batching": "static"}, "batching": {"max_queue_delay_microseconds": 300_000}})
    app = celery_client()
    # When two greedy generations arrive together, Then they run as one static batch and give their texts
    sent = [_send(app, prompt=p, max_new_tokens=8) for p in (PROMPT, "A dog")]
    results = [r.get(timeout=120) for r in sent]
    assert max(r["metrics"]["batch_size"] for r in results) == 2
    assert results[0]["output"]["text"] == _in_process(model_dir, PROMPT, 8)[0]
