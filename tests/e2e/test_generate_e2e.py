"""hypha.generate through a real worker: greedy equals in-process transformers, streaming, stop strings, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hypha_celery import keys
from hypha_celery.harness.launch import worker_env
from hypha_celery.models.examples import TINY_LLAMA
from tests.conftest import ROOT

SMALL = {"cpu_cores": 1, "memory": "1GB"}
PROMPT = "The cat sat on"


def _generate(app: Any, **kwargs: object) -> dict[str, Any]:
    return app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "requirements": SMALL, **kwargs}).get(timeout=120)


def _in_process(model_dir: Path, prompt: str, max_new_tokens: int) -> tuple[str, int, int]:
    """Greedy generation with transformers directly on the stored files, fp32 on CPU."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = model_dir / TINY_LLAMA
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True).eval()
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    new = output[0, encoded["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), encoded["input_ids"].shape[1], new.numel()


def test_greedy_generation_through_the_worker_equals_in_process_generate(start_worker, celery_client,
                                                                         model_dir: Path) -> None:
    # Given a worker with the tiny Llama
    start_worker()
    # When it generates 24 tokens greedily
    result = _generate(celery_client(), prompt=PROMPT, max_new_tokens=24, do_sample=False)
    # Then text and token counts equal transformers' generate on the same files, and it ended for length
    text, prompt_tokens, completion_tokens = _in_process(model_dir, PROMPT, 24)
    output = result["output"]
    assert output["text"] == text
    assert output["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    assert output["finish_reason"] == "length" and completion_tokens == 24
    assert result["metrics"]["time_to_first_token_s"] > 0 and result["metrics"]["tokens_per_s"] > 0
    assert (result["metrics"]["device"], result["metrics"]["dtype"]) == ("cpu", "float32")


def test_progress_carries_the_growing_text(start_worker, celery_client) -> None:
    # Given a worker whose executor already holds the model (a first request loaded it)
    start_worker()
    app = celery_client()
    _generate(app, prompt=PROMPT, max_new_tokens=2)
    # When a long generation runs and the client polls its state
    pending = app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "prompt": PROMPT, "max_new_tokens": 240,
                                                      "requirements": SMALL})
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while not pending.ready() and time.monotonic() < deadline:
        info = pending.info if pending.state == "PROGRESS" else None
        if isinstance(info, dict) and info.get("text") is not None and (not seen or seen[-1] != info["text"]):
            seen.append(info["text"])
        time.sleep(0.01)
    final = pending.get(timeout=60)["output"]["text"]
    # Then the client saw the text before it was final (the first report comes with the first token; how many
    # more depends on how long the generation takes), and every text seen is a prefix of the final one
    assert seen and min(len(text) for text in seen) < len(final)
    assert all(final.startswith(text) for text in seen)


def test_a_stop_string_cuts_the_text_and_ends_with_stop(start_worker, celery_client) -> None:
    # Given a worker and the text greedy generation gives
    start_worker()
    app = celery_client()
    full = _generate(app, prompt=PROMPT, max_new_tokens=30)["output"]["text"]
    stop = full[8:11]
    # When the same request carries a stop string taken from that text
    output = _generate(app, prompt=PROMPT, max_new_tokens=30, stop=[stop])["output"]
    # Then the text is cut before the stop string, and the reason is "stop"
    assert output["text"] == full[:full.find(stop)]
    assert output["finish_reason"] == "stop" and output["usage"]["completion_tokens"] < 30


def test_a_classifier_sent_to_generate_is_refused_naming_hypha_infer(start_worker, celery_client) -> None:
    # Given a worker, When a text classifier is asked to generate
    start_worker()
    pending = celery_client().send_task("hypha.generate", kwargs={"model": "tiny-bert-classifier", "prompt": "hi"})
    # Then the task fails with InvalidTask naming the task to use
    with pytest.raises(Exception) as caught:
        pending.get(timeout=60)
    assert type(caught.value).__name__ == "InvalidTask" and "hypha.infer" in str(caught.value)


def test_the_cli_streams_the_generated_text(start_worker, celery_client, redis_url: str) -> None:
    # Given a worker and the text it generates for a prompt
    start_worker()
    expected = _generate(celery_client(), prompt=PROMPT, max_new_tokens=16)["output"]
    # When `hypha-celery run generate` asks for the same
    out = subprocess.run(
        [sys.executable, "-m", "hypha_celery.cli", "run", "generate", "--model", TINY_LLAMA, "--prompt", PROMPT,
         "--max-new-tokens", "16"],
        capture_output=True, timeout=120, cwd=ROOT, env=worker_env(redis_url, redis_url, redis_url),
    )
    # Then it printed that text, then why it ended and the token counts
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == expected["text"] + "\n"
    assert f"finish_reason=length prompt_tokens={expected['usage']['prompt_tokens']} completion_tokens=16" \
        in out.stderr.decode()


def test_the_cli_embeds_and_classifies_through_the_worker(start_worker, redis_url: str) -> None:
    # Given a worker with the example embedding and classification models
    start_worker()
    env = worker_env(redis_url, redis_url, redis_url)
    cli = [sys.executable, "-m", "hypha_celery.cli", "run"]
    # When `run embed` embeds two texts
    out = subprocess.run([*cli, "embed", "--model", "tiny-bert-embedder", "one text", "another text"],
                         capture_output=True, timeout=120, cwd=ROOT, env=env)
    # Then it prints one JSON line per text, each a unit vector
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [row["text"] for row in rows] == ["one text", "another text"]
    assert all(abs(sum(v * v for v in row["embedding"]) - 1.0) < 1e-4 for row in rows)
    # When `run classify` classifies a text, Then it prints a label the model has, its score and the text
    out = subprocess.run([*cli, "classify", "--model", "tiny-bert-classifier", "I loved this film"],
                         capture_output=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    label, score, text = out.stdout.decode().rstrip("\n").split("\t")
    assert label in ("negative", "positive") and 0.0 <= float(score) <= 1.0 and text == "I loved this film"


def test_auto_requirements_reserve_the_estimate_and_nothing_for_a_held_model(start_worker, celery_client,
                                                                             model_dir: Path) -> None:
    from hypha_celery.models.store import ModelStore
    from hypha_celery.stages.sizing import estimate, prompt_token_bound

    # Given a worker whose serving executor does not hold the tiny Llama yet
    start_worker()
    app = celery_client()
    manifest = ModelStore(model_dir).manifest(TINY_LLAMA)
    tokens = prompt_token_bound(PROMPT, None, manifest.max_length) + 8

    def reserved() -> int:
        kwargs = {"model": TINY_LLAMA, "prompt": PROMPT, "max_new_tokens": 8}  # no requirements: "auto"
        return app.send_task("hypha.generate", kwargs=kwargs).get(timeout=120)["metrics"]["reserved"]["memory"]

    # When a request names no memory, the first reserves weights + KV cache + margin ...
    assert reserved() == estimate(manifest, gpu=False, cached=False, tokens=tokens).host
    # ... and the next, with the model held (and counted by the cache's own account), leaves the weights out
    assert reserved() == estimate(manifest, gpu=False, cached=True, tokens=tokens).host


def test_an_auto_request_that_cannot_fit_is_refused_by_admission(start_worker, celery_client) -> None:
    from hypha_celery.errors import InsufficientCapabilities

    # Given the only worker has less memory than the tiny Llama's auto size (its runtime floor alone is 256 MiB)
    start_worker({"resources": {"node_id": "tiny-node", "memory": "200MiB"}})
    app = celery_client()
    # When a generation asks for "auto" memory, admission refuses it at once, naming what was asked
    with pytest.raises(InsufficientCapabilities, match="largest seen has"):
        app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "prompt": PROMPT,
                                                "requirements": {"memory": "auto"}}).get(timeout=60)
    # ... while a request that states a size that fits runs
    result = app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "prompt": PROMPT, "max_new_tokens": 4,
                                                     "requirements": {"memory": "150MiB"}}).get(timeout=120)
    assert result["output"]["usage"]["completion_tokens"] >= 1


def test_concurrent_greedy_generations_are_batched_and_equal_single_requests(start_worker, celery_client,
                                                                              model_dir: Path) -> None:
    # Given a worker that waits up to 0.3 s to form a batch
    start_worker({"max_concurrent_tasks": 6, "batching": {"max_queue_delay_microseconds": 300_000}})
    app = celery_client()
    prompts = ["The cat sat on", "Once upon a time", "A dog", "The sun rose over the"]
    # When four greedy generations with the same settings arrive together
    sent = [app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "prompt": p, "max_new_tokens": 12,
                                                    "requirements": SMALL}) for p in prompts]
    results = [r.get(timeout=120) for r in sent]
    # Then some ran as one batch, and each text equals transformers' generate on that prompt alone
    assert max(r["metrics"]["batch_size"] for r in results) > 1
    for prompt, result in zip(prompts, results, strict=True):
        text, prompt_tokens, completion_tokens = _in_process(model_dir, prompt, 12)
        assert result["output"]["text"] == text
        assert result["output"]["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    # ... while a seeded sampled generation repeats its text, whether it shares the running batch (its row
    # draws from its own generator) or not
    seeded = {"model": TINY_LLAMA, "prompt": "The cat", "max_new_tokens": 8, "do_sample": True, "seed": 3,
              "requirements": SMALL}
    twice = [app.send_task("hypha.generate", kwargs=seeded) for _ in range(2)]
    outs = [r.get(timeout=120) for r in twice]
    assert outs[0]["output"]["text"] == outs[1]["output"]["text"]


def test_a_worker_that_preloads_answers_its_first_request_from_the_cache(start_worker, celery_client) -> None:
    # Given a worker that starts its serving executor and loads the tiny Llama at boot
    worker = start_worker({"execution": {"prewarm": True}, "models": {"preload": [TINY_LLAMA]}})
    assert "serving executors ready" in worker.output() and f"preloaded {TINY_LLAMA} on cpu" in worker.output()
    # When its first request arrives, Then the model is already in the cache
    result = _generate(celery_client(), prompt=PROMPT, max_new_tokens=4)
    assert result["metrics"]["cache_hit"] is True and result["metrics"]["load_s"] == 0.0


def test_a_multi_megabyte_prompt_is_refused_before_admission_and_the_model_stays_cached(
        start_worker, celery_client, redis_client) -> None:
    from hypha_celery.errors import InvalidInput

    # Given a worker whose serving executor holds the tiny Llama (256 tokens: a text may have 8192 bytes)
    start_worker()
    app = celery_client()
    _generate(app, prompt=PROMPT, max_new_tokens=2)
    # When a 4 MiB prompt arrives with a small reservation (the fast tokenizer would take ~100 bytes a character)
    hostile = app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "prompt": "x" * 4 * 2**20, "max_new_tokens": 2,
                                                      "requirements": {"cpu_cores": 1, "memory": "300MiB"}})
    # Then it fails with InvalidInput naming the bound, and no lease was ever taken for it
    with pytest.raises(InvalidInput, match="prompt is 4194304 bytes, above the 8192 bytes"):
        hostile.get(timeout=120)
    assert not redis_client.exists(keys.task_guard(hostile.id))
    # ... and the next request is answered from the model cache
    assert _generate(app, prompt=PROMPT, max_new_tokens=2)["metrics"]["cache_hit"] is True


def test_a_lone_surrogate_in_a_prompt_or_a_training_text_is_refused_before_anything_is_reserved(
        start_worker, celery_client, redis_client, store_dir: Path) -> None:
    from hypha_celery.errors import InvalidInput

    # Given a worker (on its own store copy: a training task must not write the session's)
    start_worker({"models": {"model_dir": str(store_dir)}})
    app = celery_client()
    # When a prompt and an inline training text carry a lone surrogate (JSON's "\ud800")
    prompt = app.send_task("hypha.generate", kwargs={"model": TINY_LLAMA, "prompt": "The cat\ud800",
                                                     "requirements": SMALL})
    train = app.send_task("hypha.train", kwargs={"model": TINY_LLAMA, "data": {"texts": ["fine", "bad \udfff"]},
                                                 "max_steps": 1, "requirements": SMALL})
    # Then each fails with InvalidInput naming the argument and the character, and neither took a lease
    with pytest.raises(InvalidInput, match=r"prompt is not valid Unicode: character 7 is a lone surrogate"):
        prompt.get(timeout=120)
    with pytest.raises(InvalidInput, match=r"data\.texts\[1\] is not valid Unicode: character 4"):
        train.get(timeout=120)
    assert not redis_client.exists(keys.task_guard(prompt.id)) and not redis_client.exists(keys.task_guard(train.id))
