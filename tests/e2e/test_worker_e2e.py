"""End to end: a real worker process, a real broker, a real torch model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kombu import Connection

from hypha_celery.errors import InvalidInput, UnsupportedModel
from hypha_celery.models.store import ModelStore
from hypha_celery.runtimes.registry import load

ROWS = [[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]]


def direct(model_dir: Path, model: str, inputs: Any) -> torch.Tensor:
    loaded, _ = load(ModelStore(model_dir).open(model), "cpu")
    with torch.inference_mode():
        return loaded.module(torch.tensor(inputs, dtype=torch.float32).reshape(-1, *loaded.manifest.input_shape))


def test_infer_over_redis_matches_the_model_run_directly(start_worker, celery_client, model_dir: Path) -> None:
    # Given a worker on Redis
    start_worker()
    app = celery_client()
    # When a client submits hypha.infer with apply_async
    result = app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": ROWS}).get(timeout=60)
    # Then the numbers equal the model run here, and the result says where and how long
    assert torch.allclose(torch.tensor(result["output"]), direct(model_dir, "mlp", ROWS), atol=1e-5)
    assert result["model"] == "mlp" and result["worker"].startswith("w0-")
    metrics = result["metrics"]
    assert metrics["finished_at"] >= metrics["started_at"] > 0
    assert metrics["duration_s"] >= 0 and metrics["device"] == "cpu"


def test_infer_cnn_single_sample(start_worker, celery_client, model_dir: Path) -> None:
    start_worker()
    image = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(3)).tolist()
    result = celery_client().send_task("hypha.infer", kwargs={"model": "cnn", "inputs": image}).get(timeout=60)
    # A single sample in gives a single row out
    assert torch.allclose(torch.tensor(result["output"]), direct(model_dir, "cnn", image)[0], atol=1e-5)


def test_infer_over_rabbitmq(start_worker, celery_client, amqp_url: str, redis_url: str, model_dir: Path) -> None:
    # Given a worker whose broker is RabbitMQ (results in Redis)
    with Connection(amqp_url) as conn:
        channel = conn.channel()
        for queue in ("hypha",):
            try:
                channel.queue_purge(queue)
            except Exception:
                channel = conn.channel()
    start_worker(broker=amqp_url)
    app = celery_client(broker=amqp_url)
    # When a task is submitted over AMQP
    result = app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": ROWS}).get(timeout=60)
    # Then it ran the real model
    assert torch.allclose(torch.tensor(result["output"]), direct(model_dir, "mlp", ROWS), atol=1e-5)


def test_failed_task_carries_the_error_class(start_worker, celery_client) -> None:
    start_worker()
    app = celery_client()
    with pytest.raises(UnsupportedModel, match="not in this worker's store"):
        app.send_task("hypha.infer", kwargs={"model": "resnet9000", "inputs": ROWS}).get(timeout=60)
    with pytest.raises(InvalidInput, match=r"takes \[4\] per sample"):
        app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": [[1.0, 2.0]]}).get(timeout=60)
    failed = app.send_task("hypha.infer", kwargs={"model": "mlp"})
    with pytest.raises(Exception) as caught:
        failed.get(timeout=60)
    assert type(caught.value).__name__ == "InvalidTask"


def test_pickled_message_is_refused_and_the_worker_keeps_serving(start_worker, celery_client) -> None:
    # Given a running worker
    worker = start_worker()
    app = celery_client()
    # When a message arrives with content type application/x-python-serialize
    pickled = app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": ROWS}, serializer="pickle")
    # Then a valid task sent after it still completes
    ok = app.send_task("hypha.infer", kwargs={"model": "mlp", "inputs": ROWS}).get(timeout=60)
    assert ok["model"] == "mlp"
    # ... the pickled one never ran: it failed by name, and the worker said why in one line
    assert pickled.state == "FAILURE" and type(pickled.result).__name__ == "MalformedMessage"
    log = worker.output()
    assert "application/x-python-serialize" in log and "ContentDisallowed" in log
    assert log.count(pickled.id) == 1
    assert worker.alive()
