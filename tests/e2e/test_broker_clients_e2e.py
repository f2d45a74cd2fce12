"""hypha's Redis transport builds one redis-py client per connection pool, not one per command, on a real Redis.

kombu's channel builds a new ``redis.Redis`` for each command outside a pipeline it was handed
(events, taking a message, acks); with redis-py 8 that costs about 160 us each on the worker's
event-loop thread. :mod:`hypha_celery.worker.broker` hands one client out again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu import Connection, Exchange, Queue
from kombu.transport.redis import Transport as KombuRedisTransport

from hypha_celery.worker.broker import Transport


@contextmanager
def channel_on(transport: type, redis_url: str) -> Iterator[Any]:
    conn = Connection(redis_url, transport=transport)
    try:
        yield conn.default_channel
    finally:
        conn.release()


def counting_clients(channel: Any) -> list[Any]:
    """Every client ``channel`` builds from now on (its ``_create_client``, wrapped)."""
    built: list[Any] = []
    create = channel._create_client

    def counted(*args: Any, **kwargs: Any) -> Any:
        client = create(*args, **kwargs)
        built.append(client)
        return client

    channel._create_client = counted
    return built


def exchange_round(channel: Any, name: str, n: int) -> int:
    """Publish ``n`` messages to a queue and a fanout exchange, take and ack each; how many came back."""
    queue = Queue(name, Exchange(name, type="direct"), name, channel=channel)
    queue.declare()
    fanout = Exchange(f"{name}.fanout", type="fanout", channel=channel)
    fanout.declare()
    producer = channel.connection.client.Producer(channel)
    taken = 0
    for i in range(n):
        producer.publish({"n": i}, exchange=queue.exchange, routing_key=name, declare=[queue])
        producer.publish({"event": i}, exchange=fanout)
        message = queue.get(no_ack=False)
        if message is not None:
            message.ack()
            taken += 1
    return taken


def test_one_client_serves_every_command_of_a_channel(redis_url: str, redis_client: redis.Redis) -> None:
    # Given a channel on hypha's transport and one on kombu's own
    with channel_on(Transport, redis_url) as ours, channel_on(KombuRedisTransport, redis_url) as kombus:
        ours_built, kombus_built = counting_clients(ours), counting_clients(kombus)
        # When each sends, takes and acks 20 messages and publishes 20 fanout messages
        assert exchange_round(ours, "hypha-test-clients", 20) == 20
        assert exchange_round(kombus, "hypha-test-clients-kombu", 20) == 20
        # Then kombu's built a client per command, ours one, and every message was taken and acked
        assert len(kombus_built) >= 60
        assert len(ours_built) == 1
        assert redis_client.llen("hypha-test-clients") == 0
        assert redis_client.hlen("unacked") == 0


def test_a_new_pool_gets_a_new_client(redis_url: str, redis_client: redis.Redis) -> None:
    # Given a channel that has sent a command through its shared client
    with channel_on(Transport, redis_url) as channel:
        built = counting_clients(channel)
        assert exchange_round(channel, "hypha-test-repool", 1) == 1
        first = channel._pooled_client()
        # When its pools are dropped (what kombu does after a fork or a lost connection)
        channel._disconnect_pools()
        # Then the next command builds a client on the new pool, and it works
        assert exchange_round(channel, "hypha-test-repool", 1) == 1
        second = channel._pooled_client()
        assert second is not first and second.connection_pool is channel.pool
        assert len(built) == 2


def test_threads_share_the_client(redis_url: str, redis_client: redis.Redis) -> None:
    # Given a channel that has sent one command, and 8 threads each publishing 50 messages through it at once
    with channel_on(Transport, redis_url) as channel:
        built = counting_clients(channel)
        with channel.conn_or_acquire() as client:
            client.delete("hypha-test-threads")
        start = threading.Barrier(8)

        def publish(thread: int) -> None:
            start.wait()
            for i in range(50):
                with channel.conn_or_acquire() as client:
                    client.lpush("hypha-test-threads", f"{thread}-{i}")

        threads = [threading.Thread(target=publish, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        # Then every message arrived once, through one client (each command took its own connection from the pool)
        sent = {value.decode() for value in redis_client.lrange("hypha-test-threads", 0, -1)}
        assert sent == {f"{t}-{i}" for t in range(8) for i in range(50)}
        assert redis_client.llen("hypha-test-threads") == 400
        assert len(built) == 1
