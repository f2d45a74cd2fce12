"""hypha.generate through a real worker: greedy equals in-process transformers, streaming, stop strings, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.models.examples import TINY_LLAMA
from hypha_celery.tools.launch import worker_env
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
    # Then at least two different texts were seen, each a prefix of the final text
    assert len(set(seen)) >= 2
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
        [sys.executable, "-m", "hypha_celery.tools.cli", "run", "generate", "--model", TINY_LLAMA, "--prompt", PROMPT,
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
    cli = [sys.executable, "-m", "hypha_celery.tools.cli", "run"]
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
