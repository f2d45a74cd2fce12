"""``make bench``'s counters: what they count as a round trip and a command, on a real redis-server of their own.

The server is this module's alone (not ``redis_url``, which CI may share): its INFO counters are server-wide.
"""

from __future__ import annotations

import redis

from bench.counts import RedisCounter, parse_rabbitmq_counters


def test_reading_the_counter_counts_nothing(own_redis: redis.Redis) -> None:
    # Given a counter; When nothing happens between start and stop
    counter = RedisCounter(own_redis)
    counter.start()
    counts = counter.stop()
    # Then its own INFO readings are not counted
    assert counts.round_trips == 0
    assert counts.commands == {}


def test_a_pipeline_a_transaction_and_a_script_are_one_round_trip_each(own_redis: redis.Redis) -> None:
    # Given a counter, and a second client doing the work
    counter = RedisCounter(own_redis)
    other = redis.Redis(connection_pool=redis.ConnectionPool(**own_redis.connection_pool.connection_kwargs))
    other.ping()  # connected before counting
    counter.start()
    # When it sends a 3-command pipeline, a MULTI/EXEC block of 2, a script running 2 commands, and one GET
    with other.pipeline(transaction=False) as pipe:
        pipe.set("a", 1)
        pipe.incr("a")
        pipe.get("a")
        pipe.execute()
    with other.pipeline(transaction=True) as pipe:
        pipe.set("b", 1)
        pipe.get("b")
        pipe.execute()
    other.eval("redis.call('SET', KEYS[1], 1); return redis.call('GET', KEYS[1])", 1, "c")
    other.get("a")
    counts = counter.stop()
    other.close()
    # Then each request sent at once is one round trip, and every command Redis ran is counted by name
    # (redis-py sends INCR as INCRBY)
    assert counts.round_trips == 4
    assert counts.commands == {"set": 3, "incrby": 1, "get": 4, "multi": 1, "exec": 1, "eval": 1}
    assert counts.bytes_in > 0 and counts.bytes_out > 0
    assert counts.per(2)["round_trips"] == 2


def test_rabbitmq_counters_are_summed_over_queue_types() -> None:
    # Given rabbitmqctl's lines for AMQP 0-9-1 and another protocol
    text = "\n".join([
        "[amqp091] messages_received_total 12",
        "[amqp091] publishers 2",
        "[amqp091,rabbit_classic_queue] messages_delivered_total 5",
        "[amqp091,rabbit_quorum_queue] messages_delivered_total 2",
        "[mqtt311] messages_received_total 100",
    ])
    # When parsed; Then only AMQP 0-9-1's message counters remain, queue types summed
    assert parse_rabbitmq_counters(text) == {"received": 12, "delivered": 7}
