"""``hypha-celery top``: a live view of the registry's workers, redrawn every few seconds."""

from __future__ import annotations

import time

import click

from hypha_celery.cli.workers import live_workers
from hypha_celery.config import load_config, registry_url

__all__ = ["top"]


@click.command()
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--registry", default=None, help="Registry Redis URL.")
def top(interval: float, once: bool, registry: str | None) -> None:
    """A live view of workers: free vs total resources, leases, cache hit rate."""
    from hypha_celery.monitoring.top import render

    while True:
        frame = render(live_workers(registry), registry or registry_url(load_config()))
        if once:
            click.echo(frame)
            return
        click.clear()
        click.echo(frame)
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return
