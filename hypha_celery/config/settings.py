"""Celery settings for hypha-celery workers and schedulers, with why.

Loaded by :func:`hypha_celery.celery.create_app` with
``app.config_from_object("hypha_celery.config.settings")``; an operator's
``celeryconfig`` module, where one is importable, overrides them.
Values that follow from the worker's TOML (broker, result backend, time
limits, visibility timeout, concurrency) are computed here from
``$HYPHA_CONFIG`` (or the seed's defaults) and recomputed when a worker is
started with ``--hypha-config PATH``; both go through
:func:`hypha_celery.config.celery_settings`.
"""

from hypha_celery.config import celery_settings, settings_config

# $HYPHA_CONFIG's values (or the seed's defaults). A bad file does not stop a
# scheduler or Flower from importing this: it is logged here, and a worker
# started with it refuses to run with the key named (exit status 78).
_derived = celery_settings(settings_config())

# Where tasks and results travel. $HYPHA_BROKER_URL (';'-separated for
# failover) or [worker.network] gateway_addresses; default redis://127.0.0.1:6379/0.
# A list of URLs makes Celery fail over between them in order.
broker_url = _derived["broker_url"]
result_backend = _derived["result_backend"]

# JSON only. Pickle deserialisation runs arbitrary code from whoever can
# publish to the broker; a worker that runs strangers' ML work must refuse it.
# A pickled message is rejected by kombu before any task code runs.
accept_content = ["json"]
result_accept_content = ["json"]
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"

# Acknowledge after the task ran, not when it arrived: a worker killed
# mid-task leaves the message on the broker, so another worker runs it.
task_acks_late = True
# ... and when a pool process dies under a task (kill -9, OOM killer), put
# the message back instead of acking it as failed.
task_reject_on_worker_lost = True
# Reserve one message per free slot: a long ML task must not sit on
# prefetched messages that idle workers could run.
worker_prefetch_multiplier = 1

# The control plane runs in threads; the ML work itself runs in spawned
# executor processes (hypha_celery.executor), so no pool process ever holds
# a CUDA context and one worker shares one model cache. That default is set
# when the worker starts (hypha_celery.worker.options), not here: a
# worker_pool setting would make Celery ignore an explicit `--pool prefork`.
worker_concurrency = _derived["worker_concurrency"]

# Task events for Flower and celery-exporter; the "sent" event lets them
# see tasks that are still queued.
worker_send_task_events = True
task_send_sent_event = True
# STARTED and PROGRESS states are what a client polls to see where a task is. (Hypha tasks store
# STARTED themselves, after validation, with their reservation: hypha_celery.worker.backend.)
task_track_started = True

# Our executor kills a task at task_timeout (SIGTERM, then SIGKILL after a
# grace); Celery's limits sit above that as a backstop under --pool prefork.
task_soft_time_limit = _derived["task_soft_time_limit"]
task_time_limit = _derived["task_time_limit"]

# Redis redelivers an unacked message after visibility_timeout (default 1 h):
# shorter than a run means the task runs twice (Celery #5935). It is derived
# to sit above task_timeout plus the admission backoff; a redelivered copy of
# a task that is still running is also caught by the ledger's task guard.
broker_transport_options = _derived["broker_transport_options"]
result_backend_transport_options = _derived["result_backend_transport_options"]

# Every worker consumes the shared queue and its own queue
# ("hypha.worker.<nodename>"), which a scheduler picks through placement.
task_default_queue = "hypha"
# [worker.network] shared_queue_type: "quorum" declares the shared queue as a RabbitMQ quorum
# queue (x-queue-type=quorum; Celery then turns off global QoS and sends countdowns through its
# native delayed delivery). Per-worker queues stay classic. A scheduler must use the same value:
# RabbitMQ refuses to declare an existing queue with another type.
task_default_queue_type = _derived["task_default_queue_type"]
task_create_missing_queues = True
task_routes = ("hypha_celery.routing.route_by_requirements",)

# Keep results a day: long enough for a scheduler to collect them, short
# enough that Redis does not fill with old outputs. Not "extended": that would
# copy every task's inputs (often megabytes of tensors) into its result.
result_expires = 86400
result_extended = False

# Keep retrying the broker at start-up and after it drops.
broker_connection_retry_on_startup = True
broker_connection_max_retries = None

