"""Nothing waits for a dead worker: re-publish what it held, drain its own queue (Redis broker).

Two kinds of message wait for one worker, and stay put when it dies for good (kill -9, a lost host):

* messages it *reserved*: the task it was running, tasks waiting out an admission backoff (an
  ETA), prefetched ones. Kombu's Redis transport keeps each in its ``unacked`` hash (delivery tag
  -> ``[message, exchange, routing key]``), with the time of delivery in ``unacked_index``; by
  itself it puts them back only after ``visibility_timeout``, which is derived from ``task_timeout``
  (hours for a long training task).
* messages in its own queue ``hypha.worker.<id>``: placed there by ``submit()`` or by a worker that
  deferred a task to it in the window before its registry record expired, or put back there after
  it had reserved them.

Every worker runs :class:`SweeperStep`, a thread that every ``lease_heartbeat / 2``:

1. *touches*: sets the ``unacked_index`` score of each message it still holds to now (``ZADD XX``),
   so a held message never looks older than one period; and marks its own queue as consumed in
   ``hypha:queue_owners`` (worker id -> now + 2 x ``lease_heartbeat``, registry Redis clock).
2. *sweeps*, if it holds the sweeper lock (``hypha:sweeper``, a redis-py lock with a TTL of three
   periods, renewed while held: one worker sweeps at a time, another takes over within three
   periods of its death):

   * a hypha task's message in ``unacked`` that nobody touched for 2 x ``lease_heartbeat`` and whose
     task holds no live lease (its task guard is not a lease id) is re-published as it is - same
     id, same signed envelope, same headers, marked ``redelivered`` as kombu's own restore marks it -
     to the shared queue (a per-worker routing key is rewritten to the shared queue's);
   * every message in the queue of a worker whose mark expired moves to the shared queue.

Each move is one Lua script that first checks the message is still where it was read (a
compare-and-move), so the sweeper never loses a message and never sends one twice. A copy that
meets its task still running or already finished is caught by the pipeline's duplicate guard and
result check. After any Redis error, and for two heartbeats after start, the sweeper only touches:
every live worker has touched what it holds again before anything counts as orphaned.
Broker clocks: ages in ``unacked_index`` are read against the broker's ``TIME``; kombu writes the
first score with the delivering host's clock, so hosts should agree within a heartbeat (NTP).

RabbitMQ does not need the first part (it redelivers a dead consumer's messages when its
connection closes) and does not get the second yet: see the README's reliability section.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import bootsteps
from kombu.utils.json import dumps, loads

from hypha_celery import keys
from hypha_celery.keys import KeySchema

__all__ = ["BrokerQueues", "Sweeper", "SweeperStep"]

log = logging.getLogger(__name__)

_WORKER_QUEUE = keys.worker_queue("")
# Move one reserved message back to a queue, if it is still reserved with the text that was read.
_REQUEUE_UNACKED = """
local UNACKED, INDEX, DESTINATION = KEYS[1], KEYS[2], KEYS[3]
local TAG, EXPECTED, PAYLOAD = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', UNACKED, TAG) ~= EXPECTED then return 0 end
redis.call('HDEL', UNACKED, TAG)
redis.call('ZREM', INDEX, TAG)
redis.call('RPUSH', DESTINATION, PAYLOAD)
return 1
"""
# Move the newest message of a list to the consuming end of another, if it is still the one read.
_MOVE_NEWEST = """
local SOURCE, DESTINATION = KEYS[1], KEYS[2]
local EXPECTED, PAYLOAD = ARGV[1], ARGV[2]
if redis.call('LINDEX', SOURCE, 0) ~= EXPECTED then return 0 end
redis.call('LPOP', SOURCE)
redis.call('RPUSH', DESTINATION, PAYLOAD)
return 1
"""
_DRAIN_LIMIT = 1000  # messages moved from one list per sweep; the next sweep moves the rest
_ORPHAN_LIMIT = 100  # orphaned reservations examined per sweep; the next sweep examines the rest
_NOT_OURS_LIMIT = 10_000  # reservations remembered as not ours to move (another app's, unreadable)
_FORGET_S = 3600.0  # a dead worker's mark is kept (its queue drained) this long after it expired


def _owner(queue: str) -> bool:
    return queue.startswith(_WORKER_QUEUE)


class BrokerQueues:
    """Kombu's Redis layout for queues and reservations, read and moved atomically.

    ``channel`` is a connected kombu Redis channel: its key prefix, priority lists and
    ``unacked`` key names are kombu's (transport options included).
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.prefix = channel.global_keyprefix or ""
        self.client = redis.Redis(connection_pool=channel.pool)  # unprefixed: key names are prefixed here
        self._requeue = self.client.register_script(_REQUEUE_UNACKED)
        self._move = self.client.register_script(_MOVE_NEWEST)

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def lists(self, queue: str) -> list[str]:
        """The Redis lists behind one queue, one per priority step."""
        return [self.key(self.channel._q_for_pri(queue, pri)) for pri in self.channel.priority_steps]

    def now(self) -> float:
        seconds, micros = self.client.time()
        return float(seconds) + micros / 1e6

    def touch(self, tags: Iterable[str], now: float) -> None:
        """Mark reservations as held now; a tag already acked is not added back."""
        mapping = dict.fromkeys(tags, now)
        if mapping:
            self.client.zadd(self.key(self.channel.unacked_index_key), mapping, xx=True)

    def untouched(self, before: float) -> list[str]:
        """Delivery tags of reservations nobody touched since ``before``, oldest first."""
        raw = self.client.zrangebyscore(self.key(self.channel.unacked_index_key), "-inf", before)
        return [t.decode() if isinstance(t, bytes) else str(t) for t in raw]

    def reserved(self, tag: str) -> bytes | None:
        value = self.client.hget(self.key(self.channel.unacked_key), tag)
        return value if isinstance(value, bytes) else None

    def requeue(self, tag: str, raw: bytes, payload: dict[str, Any], queue: str) -> bool:
        """Put a reserved message (``raw`` as read) on ``queue`` as ``payload``; False if it moved meanwhile."""
        pri = self.channel._get_message_priority(payload, reverse=False)
        target = self.key(self.channel._q_for_pri(queue, pri))
        unacked, index = self.key(self.channel.unacked_key), self.key(self.channel.unacked_index_key)
        return bool(self._requeue(keys=[unacked, index, target], args=[tag, raw, dumps(payload)]))

    def sizes(self, queues: list[str]) -> dict[str, int]:
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                for name in self.lists(queue):
                    pipe.llen(name)
            counts = pipe.execute()
        steps = len(self.channel.priority_steps)
        return {queue: sum(counts[i * steps:(i + 1) * steps]) for i, queue in enumerate(queues)}

    def drain(self, queue: str, into: str, rewrite: Callable[[bytes], str]) -> int:
        """Move every message of ``queue`` to ``into`` (same priority, same order); how many moved."""
        moved = 0
        for source, target in zip(self.lists(queue), self.lists(into), strict=True):
            for _ in range(_DRAIN_LIMIT):
                raw = self.client.lindex(source, 0)
                if not isinstance(raw, bytes):
                    break
                moved += int(self._move(keys=[source, target], args=[raw, rewrite(raw)]))
        return moved


class Sweeper:
    """One worker's part: touch what it holds, mark its queue, and sweep when it holds the lock."""

    def __init__(
        self,
        broker: BrokerQueues,
        registry: redis.Redis,
        worker_id: str,
        *,
        heartbeat: float,
        shared_queue: str,
        shared_route: tuple[str, str],
        held: Callable[[], list[str]],
        schema: KeySchema | None = None,
    ) -> None:
        self.broker = broker
        self.registry = registry
        self.worker_id = worker_id
        self.schema = schema or KeySchema.from_env()
        self.period = heartbeat / 2
        self.orphan_after = 2 * heartbeat
        self.shared_queue = shared_queue
        self.shared_route = shared_route
        self.held = held
        self.lock = registry.lock(self.schema.sweeper_lock(), timeout=max(1.0, 3 * self.period),
                                  blocking=False, thread_local=False)
        self.token = f"{worker_id}:{uuid.uuid4().hex}"
        self.settled_at = time.monotonic() + self.orphan_after + self.period
        self.healthy = True
        self.not_ours: set[str] = set()  # delivery tags never to read again: kombu's restore handles them

    def run_once(self) -> None:
        """One period: touch and mark; sweep when leading. A Redis error is logged once and waited out."""
        try:
            now = self.broker.now()
            self.broker.touch(self.held(), now)
            self._mark_alive()
            if self._lead() and time.monotonic() >= self.settled_at:
                self.sweep(now)
        except (redis.RedisError, OSError) as exc:
            if self.healthy:
                log.warning("queue sweeper: Redis unreachable (%s); retrying every %.1fs", exc, self.period)
            self.healthy = False
            self.settled_at = time.monotonic() + self.orphan_after + self.period
            return
        if not self.healthy:
            log.warning("queue sweeper: Redis reachable again")
        self.healthy = True

    def _mark_alive(self) -> None:
        seconds, micros = self.registry.time()
        now = float(seconds) + micros / 1e6
        self.registry.zadd(self.schema.queue_owners(), {self.worker_id: now + self.orphan_after})

    def _lead(self) -> bool:
        try:
            if self.lock.owned():
                self.lock.reacquire()
                return True
            return bool(self.lock.acquire(blocking=False, token=self.token))
        except redis.exceptions.LockError:
            return False

    def release(self) -> None:
        try:
            if self.lock.owned():
                self.lock.release()
        except (redis.RedisError, OSError):
            pass  # it expires by itself

    def sweep(self, now: float) -> tuple[int, int]:
        """Re-publish orphaned reservations and drain dead workers' queues; how many of each moved."""
        return self.requeue_orphans(now), self.drain_dead_queues()

    def requeue_orphans(self, now: float) -> int:
        moved = 0
        if len(self.not_ours) > _NOT_OURS_LIMIT:
            self.not_ours.clear()
        candidates = [tag for tag in self.broker.untouched(now - self.orphan_after) if tag not in self.not_ours]
        for tag in candidates[:_ORPHAN_LIMIT]:
            raw = self.broker.reserved(tag)
            if raw is None:
                continue
            try:
                payload, _exchange, routing_key = loads(raw)
                headers = payload.get("headers") or {}
                task, task_id = str(headers.get("task", "")), str(headers.get("id", ""))
            except (ValueError, TypeError, AttributeError):
                payload, routing_key, task, task_id = None, "", "", ""
            # Not a hypha task, or one from a queue of someone else's: kombu's own restore handles it.
            if not isinstance(payload, dict) or not task.startswith("hypha.") or not task_id or (
                    routing_key != self.shared_queue and not _owner(str(routing_key))):
                self.not_ours.add(tag)
                continue
            guard = self.registry.get(self.schema.task_guard(task_id))
            if guard is not None and guard != b"done":
                continue  # a live lease still runs it (its holder renews it)
            if self.broker.requeue(tag, raw, self._rerouted(payload), self.shared_queue):
                moved += 1
                log.warning("task %s (%s): its worker stopped holding it (no sign of life for %.0fs, no live "
                            "lease); re-published to %s", task_id, task, self.orphan_after, self.shared_queue)
        return moved

    def drain_dead_queues(self) -> int:
        seconds, micros = self.registry.time()
        now = float(seconds) + micros / 1e6
        owners = self.schema.queue_owners()
        self.registry.zremrangebyscore(owners, "-inf", now - _FORGET_S)
        dead = [w.decode() if isinstance(w, bytes) else str(w) for w in self.registry.zrangebyscore(owners, "-inf", now)]
        if not dead:
            return 0
        queues = {keys.worker_queue(worker): worker for worker in dead}
        moved = 0
        for queue, size in self.broker.sizes(list(queues)).items():
            if not size:
                continue
            count = self.broker.drain(queue, self.shared_queue, self._rerouted_raw)
            moved += count
            if count:
                log.warning("worker %s is gone: moved %d message(s) from %s to %s", queues[queue], count, queue,
                            self.shared_queue)
        return moved

    def _rerouted(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The same message, routed to the shared queue and marked redelivered (as kombu's restore marks it)."""
        exchange, routing_key = self.shared_route
        properties = payload.setdefault("properties", {})
        info = properties.setdefault("delivery_info", {})
        info.update(exchange=exchange, routing_key=routing_key, redelivered=True)
        headers = payload.get("headers")
        if isinstance(headers, dict):
            headers["redelivered"] = True
        return payload

    def _rerouted_raw(self, raw: bytes) -> str:
        try:
            payload = loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")  # moved as it is: the worker that reads it refuses it
        return dumps(self._rerouted(payload)) if isinstance(payload, dict) else raw.decode("utf-8", "replace")


def held_tags(consumer: Any) -> list[str]:
    """Delivery tags the consumer's channel holds unacked (kombu's virtual QoS), read from another thread."""
    qos = getattr(getattr(getattr(consumer, "task_consumer", None), "channel", None), "qos", None)
    delivered, dirty = getattr(qos, "_delivered", None), getattr(qos, "_dirty", None)
    if delivered is None:
        return []
    for _ in range(5):
        try:
            acked = set(dirty or ())
            return [str(tag) for tag in list(delivered) if tag not in acked]
        except RuntimeError:  # changed while read by the consumer's thread: read again
            continue
    return []


class SweeperStep(bootsteps.StartStopStep):
    """Runs this worker's :class:`Sweeper` in a thread while the consumer runs (Redis broker only)."""

    label = "hypha sweeper"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, without_hypha_sweeper: bool = False, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.enabled = not without_hypha_sweeper
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        c.hypha_sweeper = None

    def start(self, c: Any) -> None:
        if self.thread is not None and self.thread.is_alive() and not self.stopping.is_set():
            return
        app = c.app
        options = {**(app.conf.broker_transport_options or {}), "socket_timeout": 5, "socket_connect_timeout": 5}
        connection = app.connection_for_write(transport_options=options)
        if getattr(connection.transport, "driver_type", "") != "redis":
            log.info("queue sweeper off: the broker is %s, not Redis", connection.transport.driver_type)
            connection.release()
            return
        self.stopping = threading.Event()  # one per thread: a thread still ending sees its own
        self.thread = threading.Thread(target=self._run, args=(c, connection, self.stopping), name="hypha-sweeper",
                                       daemon=True)
        self.thread.start()

    def _run(self, c: Any, connection: Any, stopping: threading.Event) -> None:
        ctx = c.controller.hypha
        app = c.app
        shared = app.conf.task_default_queue
        queue = app.amqp.queues.get(shared)
        route = (queue.exchange.name, queue.routing_key) if queue is not None else (shared, shared)
        sweeper: Sweeper | None = None
        period = ctx.config.resources.lease_heartbeat / 2
        try:
            while not stopping.is_set():
                if sweeper is None:
                    try:
                        sweeper = Sweeper(BrokerQueues(connection.default_channel), ctx.redis, c.hostname,
                                          heartbeat=ctx.config.resources.lease_heartbeat, shared_queue=shared,
                                          shared_route=route, held=lambda: held_tags(c))
                        c.hypha_sweeper = sweeper
                    except Exception as exc:  # the broker is down at start (kombu's or redis' error): try again
                        log.debug("queue sweeper: broker not reachable yet (%s)", exc)
                        connection.collect()
                        stopping.wait(period)
                        continue
                try:
                    sweeper.run_once()
                except Exception:  # a bug must not end the thread: the worker keeps its sign of life
                    log.exception("queue sweeper: unexpected error; going on")
                stopping.wait(period)
        finally:
            if sweeper is not None:
                sweeper.release()
            connection.release()

    def stop(self, c: Any) -> None:
        """Ask the thread to end; wait a moment only (a consumer restart in an outage must not wait on Redis)."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=1)
            self.thread = None

    shutdown = stop
