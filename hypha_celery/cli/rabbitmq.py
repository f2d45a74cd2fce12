"""``hypha-celery rabbitmq-policy``: the RabbitMQ policy that keeps a dead worker's own queue from stranding tasks."""

from __future__ import annotations

import json

import click

__all__ = ["rabbitmq_policy"]


@click.command("rabbitmq-policy")
@click.option("--ttl", "ttl_s", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds a message may wait in a worker's own queue before it moves to the shared queue.")
@click.option("--vhost", default="/", show_default=True)
@click.option("--shared-queue", default="hypha", show_default=True, help="The shared queue (task_default_queue).")
def rabbitmq_policy(ttl_s: float, vhost: str, shared_queue: str) -> None:
    """Print the rabbitmqctl command that keeps a dead worker's own queue from stranding tasks.

    A policy (not queue arguments, which a producer's plain declare would contradict) gives every
    ``hypha.worker.*`` queue a message TTL and dead-letters what expires to the shared queue.
    """
    import shlex

    from hypha_celery.keys import worker_queue

    pattern = "^" + worker_queue("").replace(".", "\\.")
    definition = {"message-ttl": int(ttl_s * 1000), "dead-letter-exchange": "",
                  "dead-letter-routing-key": shared_queue}
    click.echo(shlex.join(["rabbitmqctl", "set_policy", "-p", vhost, "--apply-to", "queues", "--priority", "10",
                           "hypha-worker-queues", pattern, json.dumps(definition, separators=(",", ":"))]))
