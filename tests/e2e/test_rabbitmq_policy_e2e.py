"""RabbitMQ: a dead worker's own queue strands nothing once the `hypha-celery rabbitmq-policy` policy is set.

Needs the RabbitMQ of HYPHA_TEST_AMQP_URL and its `rabbitmqctl` on this machine (to set the policy);
without them it skips with the reason locally and fails in CI.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import uuid

import pytest
from kombu import Connection

from hypha_celery.keys import worker_queue


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def policy(amqp_url: str):
    if shutil.which("rabbitmqctl") is None or _rabbitmqctl("list_policies").returncode != 0:
        reason = "rabbitmqctl is missing or cannot reach the broker: the policy cannot be set"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    printed = subprocess.run([sys.executable, "-m", "hypha_celery.cli", "rabbitmq-policy", "--ttl", "2"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    command = shlex.split(printed)
    assert command[:2] == ["rabbitmqctl", "set_policy"]
    applied = _rabbitmqctl(*command[1:])
    assert applied.returncode == 0, applied.stderr
    yield
    _rabbitmqctl("clear_policy", "hypha-worker-queues")


def test_a_task_left_on_a_dead_workers_queue_reaches_a_live_worker(policy, start_worker, celery_client,
                                                                    amqp_url: str) -> None:
    # Given a live worker on RabbitMQ, and a task sent to the own queue of a worker that is gone
    ghost = worker_queue(f"ghost-{uuid.uuid4().hex[:6]}@nowhere")
    start_worker(broker=amqp_url)
    app = celery_client(broker=amqp_url)
    try:
        result = app.send_task("hypha.noop", kwargs={"requirements": {"cpu_cores": 0.1}}, queue=ghost)
        # When its message expires there (the policy's TTL), Then it is dead-lettered to the shared
        # queue and the live worker runs it
        assert result.get(timeout=60)["output"] is None
    finally:
        with Connection(amqp_url) as conn:
            conn.channel().queue_delete(ghost)
