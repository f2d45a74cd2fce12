"""How hypha plugs into ``celery worker``: CLI options, bootsteps, signals.

* ``--hypha-config PATH`` (or ``$HYPHA_CONFIG``): the worker's TOML. It is
  loaded while the command line is parsed (an eager option), so the Celery
  settings it implies - broker, time limits, visibility timeout, concurrency -
  are in place before the worker reads them. A bad file stops the worker with
  one line naming the key, and exit status 78 (EX_CONFIG). The loaded
  :class:`~hypha_celery.config.WorkerConfig` is the option's value, which
  Celery hands to the bootsteps as ``hypha_config``.
* ``--hypha-metrics-port N``: overrides ``metrics_port`` (two workers on one host).
* ``--without-hypha-registry``: do not advertise in the registry.
* ``--without-hypha-sweeper``: do not run the queue sweeper (:mod:`hypha_celery.worker.sweeper`).
* On a ``redis://`` broker the worker uses :mod:`hypha_celery.worker.broker`'s transport
  (set at ``celeryd_init``), so that a broker outage does not stop it.
* On a ``redis://`` or ``rediss://`` result backend it stores results with
  :mod:`hypha_celery.worker.backend`'s class (also at ``celeryd_init``), which carries a task's
  lease release in the result's own transaction; ``task_postrun`` hands any release no store
  carried to the lease keeper.

Bootsteps are named by path, so a scheduler that builds the app never
imports the worker's own dependencies.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click
from celery import Celery, signals

from hypha_celery import keys
from hypha_celery.config import EX_CONFIG, WorkerConfig, celery_settings, load_config, registry_url
from hypha_celery.errors import ConfigError
from hypha_celery.headers import SENT_AT
from hypha_celery.redis_client import check_registry

__all__ = ["install"]


def _fail(message: str) -> None:
    click.echo(f"hypha-celery: config error: {message}", err=True)
    sys.exit(EX_CONFIG)


def _load(ctx: click.Context, _param: click.Parameter, value: str | None) -> WorkerConfig | str | None:
    """Eager option callback: load, check and apply the worker config; the config becomes the option's value."""
    if ctx.resilient_parsing:
        return value
    from hypha_celery.worker.hostcheck import check_host

    try:
        cfg = load_config(value)
        check_host(cfg, metrics_port=_metrics_port_from_argv())
        check_registry(registry_url(cfg))  # a Redis Cluster needs HYPHA_KEY_PREFIX with a hash tag
    except ConfigError as exc:
        _fail(str(exc))
    app = ctx.obj.app
    app.conf.update(celery_settings(cfg))
    if not _pool_given():
        # Threads unless the command line names a pool. (Set as worker_pool in a config,
        # Celery's CLI would take even an explicit `--pool prefork` for its default.)
        app.conf.worker_pool = "threads"
    return cfg


def _pool_given() -> bool:
    return any(arg in ("-P", "--pool") or arg.startswith(("--pool=", "-P")) for arg in sys.argv[1:])


def _metrics_port_from_argv() -> int | None:
    """``--hypha-metrics-port`` as typed, read early: the eager config check needs it before click parses it."""
    argv = sys.argv
    for index, arg in enumerate(argv):
        if arg == "--hypha-metrics-port" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--hypha-metrics-port="):
            value = arg.split("=", 1)[1]
        else:
            continue
        try:
            return int(value)
        except ValueError:
            _fail(f"--hypha-metrics-port: expected a port number, got {value!r}")
    return None


def install(app: Celery) -> None:
    """Add hypha's worker options, bootsteps, remote-control command and signal handlers to ``app``."""
    app.user_options["worker"].add(click.Option(
        ["--hypha-config"], is_eager=True, callback=_load, default=None, envvar=None,
        help="hypha worker config (TOML); default $HYPHA_CONFIG, else the seed's defaults.",
    ))
    app.user_options["worker"].add(click.Option(
        ["--hypha-metrics-port"], type=int, default=None,
        help="Serve Prometheus metrics on this port instead of [worker.monitoring] metrics_port.",
    ))
    app.user_options["worker"].add(click.Option(
        ["--without-hypha-registry"], is_flag=True, default=False,
        help="Do not advertise this worker in the Redis registry.",
    ))
    app.user_options["worker"].add(click.Option(
        ["--without-hypha-sweeper"], is_flag=True, default=False,
        help="Do not re-publish dead workers' messages (the queue sweeper; Redis broker only).",
    ))
    app.steps["worker"].add("hypha_celery.worker.bootsteps:NodeStep")
    app.steps["consumer"].add("hypha_celery.worker.bootsteps:RegistryStep")
    app.steps["consumer"].add("hypha_celery.worker.strategy:MessageGuardStep")
    app.steps["consumer"].add("hypha_celery.worker.sweeper:SweeperStep")
    import hypha_celery.worker.control  # noqa: F401 - registers the inspect command (light: celery only)
    signals.celeryd_init.connect(_redis_transport, weak=False)
    signals.celeryd_init.connect(_result_backend, weak=False)
    signals.task_postrun.connect(_settle_release, weak=False)
    signals.celeryd_after_setup.connect(_own_queue, weak=False)
    signals.before_task_publish.connect(_stamp_sent_at, weak=False)


def _redis_transport(conf: Any = None, **_: Any) -> None:
    """A worker on Redis uses :mod:`hypha_celery.worker.broker`'s transport (a broker outage must not stop it).

    Decided here, once every setting is final (``--hypha-config``, an operator's ``celeryconfig``),
    and before the consumer opens its connection; an explicit ``broker_transport`` is kept.
    """
    from hypha_celery.worker.broker import broker_transport

    if conf is None or conf.broker_transport:
        return
    urls = [conf.broker_url, conf.broker_read_url, conf.broker_write_url]
    chosen = [broker_transport(url) for url in urls if url]
    if chosen and all(chosen):
        conf.broker_transport = chosen[0]


def _result_backend(instance: Any = None, **_: Any) -> None:
    """A worker stores results with :mod:`hypha_celery.worker.backend`'s class: a task's lease release rides along.

    Chosen through the loader's backend aliases (``redis``, ``rediss``), so the result backend URL stays as
    configured and every client (schedulers, Flower) keeps Celery's own class.
    """
    from hypha_celery.worker.backend import backend_aliases

    loader = getattr(getattr(instance, "app", None), "loader", None)
    if loader is not None:
        loader.override_backends = backend_aliases(loader.override_backends)


def _settle_release(task: Any = None, **_: Any) -> None:
    """After a task's result stores: a lease release none of them carried goes through the lease keeper."""
    from hypha_celery.worker.backend import settle_release

    settle_release(getattr(task, "request", None))


def _own_queue(sender: str, instance: Any, **_: Any) -> None:
    """Each worker also consumes ``hypha.worker.<nodename>``, which only it reads."""
    instance.app.amqp.queues.select_add(keys.worker_queue(sender))


def _stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Record when a task was first published, for ``queue_wait_s``."""
    if headers is not None and str(headers.get("task", "")).startswith("hypha."):
        headers.setdefault(SENT_AT, time.time())
