"""``make demo``: an embedded Redis, a real worker, signed inference and training tasks.

Everything lives under ``.demo/`` and is shut down at the end; nothing
outside this checkout is needed (no system Redis, no downloads).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hypha_celery.harness.launch import WorkerProcess, free_port, scrape
from hypha_celery.harness.local_node import LocalNode, local_node
from hypha_celery.units import format_size

HERE = Path.cwd() / ".demo"


def say(text: str = "") -> None:
    print(text, flush=True)


def _config(models: Path, peer: str, port: int) -> dict[str, Any]:
    return {
        "max_concurrent_tasks": 4,
        "max_memory_per_task": "2GB",
        "task_timeout": 120,
        "model_cache_size": "1GB",
        "network": {"advertisement_interval": 5},
        "models": {"model_dir": str(models), "max_model_size": "500MB"},
        "security": {"verify_task_signatures": True, "allowed_schedulers": [peer]},
        "monitoring": {"metrics_port": port, "monitor_interval": 2},
        "resources": {"node_id": "demo-node", "memory": "4GB", "lease_heartbeat": 2},
    }


def main() -> int:
    from hypha_celery.models.examples import init_examples, skipped_examples
    from hypha_celery.security import generate_key, peer_id

    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir(parents=True)
    with local_node(HERE, workers=0, name="demo") as node:
        url = node.url
        os.environ.update({"HYPHA_BROKER_URL": url, "HYPHA_RESULT_BACKEND": url, "HYPHA_REGISTRY_URL": url})
        say(f"1. embedded Redis at {url}")

        models = HERE / "models"
        for manifest in init_examples(models):
            what = manifest.task if manifest.runtime == "transformers" else f"input {manifest.input_shape}"
            say(f"2. example model {manifest.id}: {manifest.architecture}, {what}, {format_size(manifest.size)}")
        for name, why in skipped_examples():
            say(f"2. example model {name} skipped: {why}")
        key = generate_key(HERE / "scheduler.key")
        peer = peer_id(key.verify_key)
        say(f"3. scheduler key {HERE / 'scheduler.key'} (peer id {peer})")
        port = free_port()

        worker = node.start_worker(_config(models, peer, port), name="demo", wait=None)
        try:
            return _run(node, worker, key, port)
        finally:
            say("\n10. shutting down")
            node.close()
            say(f"   done (worker log: {worker.log})")
            say("   next, a worker of your own: README, *Running a worker* (a Redis, worker.toml, export HYPHA_CONFIG)")
    return 0  # pragma: no cover - the block always returns


def _wait_registered(node: LocalNode, worker: WorkerProcess, timeout: float = 90.0) -> list[dict[str, Any]]:
    try:
        return node.wait_registered(worker, timeout=timeout)
    except RuntimeError:
        raise SystemExit(f"the worker exited; see {worker.log}") from None
    except TimeoutError:
        raise SystemExit(f"the worker did not register; see {worker.log}") from None


def _run(node: LocalNode, worker: WorkerProcess, key: Any, port: int) -> int:
    from hypha_celery.client import submit
    from hypha_celery.errors import HyphaError
    from hypha_celery.models.examples import clusters

    workers = _wait_registered(node, worker)
    w = workers[0]
    say(f"4. worker {w['worker_id']} registered: {w['cpu_cores']} cores, {w['total_memory'] >> 20} MiB, "
        f"models {w['models']}, queue {w['queue']}")

    rows, labels = clusters(6, seed=7)
    names = ["setosa-like", "versicolor-like", "virginica-like"]
    handle = submit("hypha.infer", model="mlp", inputs=rows, requirements={"cpu_cores": 0.5, "memory": "256MiB"},
                    signing_key=key, verify=True)
    result = handle.get(timeout=120)  # verify=True: the worker's signature over the result is checked here
    predicted = [row.index(max(row)) for row in result["output"]]
    say("5. signed inference on mlp:")
    for row, guess, truth in zip(rows, predicted, labels, strict=True):
        say(f"   {row} -> {names[guess]:16} (true: {names[truth]})")
    m = result["metrics"]
    say(f"   {m['duration_s'] * 1000:.1f} ms, cache_hit={m['cache_hit']}, device={m['device']}, "
        f"reserved cores {m['reserved']['cpu_cores']}")
    say(f"   the answer is signed by worker {result['worker']} (peer id {handle.signer}): verified")

    import base64
    import struct

    image = [((x * 7 + y * 3) % 11) / 10 for x in range(28) for y in range(28)]
    encoded = {"dtype": "float32", "shape": [1, 1, 28, 28], "data": base64.b64encode(struct.pack("<784f", *image)).decode()}
    result = submit("hypha.infer", model="cnn", inputs=encoded, signing_key=key).get(timeout=120)
    say(f"6. cnn on an encoded 28x28 image -> {result['output']['shape']} scores ({result['output']['dtype']}), "
        f"{result['metrics']['duration_s'] * 1000:.1f} ms")

    _transformers(HERE / "models", key)

    data_rows, data_labels = clusters(600, seed=1)
    shuffled = [[v + (0.8 if i % 2 else -0.8) for v in r] for i, r in enumerate(data_rows)]
    job = submit("hypha.train", model="mlp", data={"inputs": shuffled, "targets": data_labels},
                 epochs=300, lr=0.01, batch_size=16, new_model="mlp-demo-tuned", signing_key=key)
    say("7. training mlp (progress from AsyncResult):")
    seen = None
    while not job.ready():
        if job.state == "PROGRESS" and job.info != seen:
            seen = job.info
            loss = seen.get("loss")
            say(f"   epoch {seen.get('epoch')}/{seen.get('epochs')}  step {seen.get('step')}  "
                f"loss {loss if loss is None else round(loss, 4)}  {seen.get('percent')}%")
        time.sleep(0.2)
    trained = job.get(timeout=120)
    curve = trained["output"]["loss_curve"]
    say(f"   final loss {trained['output']['final_loss']:.4f} (first epoch {curve[0]:.4f}); "
        f"new model {trained['output']['model_id']}")
    served = submit("hypha.infer", model=trained["output"]["model_id"], inputs=shuffled[:2], signing_key=key).get(timeout=120)
    say(f"   served by hypha.infer right away: {[[round(v, 2) for v in row] for row in served['output']]}")

    _migration(node, key, HERE / "models")

    say("9. refused work fails at once, with the named error:")
    for title, call in (
        ("memory over max_memory_per_task", lambda: submit("hypha.infer", model="mlp", inputs=rows,
                                                           requirements={"memory": "3GB"}, signing_key=key)),
        ("unsigned task", lambda: submit("hypha.infer", model="mlp", inputs=rows)),
        ("path traversal model id", lambda: submit("hypha.infer", model="../../etc/passwd", inputs=rows,
                                                   signing_key=key)),
    ):
        try:
            call().get(timeout=60)
            say(f"   {title}: unexpectedly succeeded")
        except HyphaError as exc:
            say(f"   {title}: {type(exc).__name__}: {exc}")

    wanted = ("hypha_worker_tasks_completed_total", "hypha_worker_tasks_failed_total", "hypha_worker_model_cache_hits_total")
    for sample, value in scrape(port).items():
        if sample.startswith(wanted):
            say(f"   metrics: {sample} {value}")
    return 0


def _migration(node: LocalNode, key: Any, models: Path) -> None:
    """A generation whose worker is killed -9 half way goes on on another worker, from its last streamed token."""
    from hypha_celery import keys
    from hypha_celery.client import stream, submit
    from hypha_celery.security import peer_id

    peer = peer_id(key.verify_key)

    if not (models / "tiny-llama").is_dir():
        return
    config = {**_config(models, peer, free_port()), "resources": {"node_id": "demo-node-2", "memory": "4GB",
                                                                  "lease_heartbeat": 2}}
    # A second worker that decodes slowly on demand (a test hook), so that the kill lands mid-generation.
    doomed = node.start_worker(config, name="demo-doomed", env={"HYPHA_TEST_DECODE_DELAY_S": "0.03"}, wait=None)
    _wait_registered(node, doomed)
    doomed_id = f"{doomed.name}@{os.uname().nodename}"
    kwargs: dict[str, Any] = {"model": "tiny-llama", "prompt": "The cat sat on", "max_new_tokens": 200}
    job = submit("hypha.generate", queue=keys.worker_queue(doomed_id), signing_key=key, **kwargs)
    say(f"8. a generation outlives its worker: 200 tokens on {doomed_id}, which is killed -9 after 2 s:")
    sys.stdout.write("   ")
    first, killed, pieces = 0.0, 0.0, []
    for piece in stream(job, timeout=180):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
        first = first or time.monotonic()
        if not killed and time.monotonic() - first > 2.0:
            doomed.kill9()
            killed = time.monotonic()
            sys.stdout.write(" [killed] ")
    done = job.get(timeout=180)
    say("")
    alone = submit("hypha.generate", signing_key=key, **kwargs).get(timeout=180)  # the same request, uninterrupted
    text = done["output"]["text"]
    say(f"   continued on {done['worker']} from token {done['resumed_from_token']} (workers {done['workers']}); "
        f"the stream's pieces are the text, each once: {''.join(pieces) == text}; "
        f"the same text as an uninterrupted run: {text == alone['output']['text']}")


def _transformers(models: Path, key: Any) -> None:
    """Hugging Face models through the same worker: sentence embeddings and text classification."""
    from hypha_celery.client import submit

    embedder = "all-minilm-l6-v2" if (models / "all-minilm-l6-v2").is_dir() else "tiny-bert-embedder"
    if not (models / embedder).is_dir():
        say("6b. no Hugging Face examples (install the [hf] extra for transformers models)")
        return
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    result = submit("hypha.infer", model=embedder, texts=texts, signing_key=key).get(timeout=180)
    vectors = result["output"]["embeddings"]

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    say(f"6b. embeddings from {embedder} ({result['output']['dim']} dimensions, "
        f"{result['metrics']['duration_s'] * 1000:.0f} ms incl. load={result['metrics']['load_s']:.2f}s):")
    say(f"   cos({texts[0]!r}, {texts[1]!r}) = {cosine(vectors[0], vectors[1]):.3f}")
    say(f"   cos({texts[0]!r}, {texts[2]!r}) = {cosine(vectors[0], vectors[2]):.3f}")
    if (models / "tiny-llama").is_dir():
        job = submit("hypha.generate", model="tiny-llama", prompt="The cat sat on", max_new_tokens=48, proof=True,
                     signing_key=key)
        say("6d. tiny-llama (random weights: nonsense, but streamed) generating from 'The cat sat on':")
        shown = ""
        sys.stdout.write("   ")
        while not job.ready():
            info = job.info if job.state == "PROGRESS" else None
            if isinstance(info, dict) and str(info.get("text", "")).startswith(shown):
                sys.stdout.write(info["text"][len(shown):])
                sys.stdout.flush()
                shown = info["text"]
            time.sleep(0.05)
        done = job.get(timeout=180)
        print(done["output"]["text"][len(shown):] if done["output"]["text"].startswith(shown) else "")
        usage, metrics = done["output"]["usage"], done["metrics"]
        say(f"   finish_reason={done['output']['finish_reason']} tokens {usage['completion_tokens']}, "
            f"{metrics['tokens_per_s']:.0f} tokens/s, first token after {metrics['time_to_first_token_s'] * 1000:.0f} ms")
        proof = done["output"]["proof"]
        checked = submit("hypha.verify", model="tiny-llama", prompt="The cat sat on", proof=proof,
                         signing_key=key).get(timeout=180)["output"]
        tampered = {**proof, "tokens": [(proof["tokens"][0] + 1) % 100, *proof["tokens"][1:]]}
        caught = submit("hypha.verify", model="tiny-llama", prompt="The cat sat on", proof=tampered,
                        signing_key=key).get(timeout=180)["output"]
        say(f"   its proof (hypha.verify replays one prefill; on a network, another worker): "
            f"accepted={checked['accepted']}; with its first token changed: accepted={caught['accepted']} "
            f"({caught['reason']})")
    if (models / "tiny-bert-classifier").is_dir():
        labelled = submit("hypha.infer", model="tiny-bert-classifier", texts=["I loved this film"],
                          signing_key=key).get(timeout=180)
        [first] = labelled["output"]
        say(f"6c. tiny-bert-classifier (random weights) on 'I loved this film' -> {first['label']} "
            f"({first['score']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
