"""``hypha-celery check-config``: a worker config validated before a worker starts with it (exit 78 on error)."""

from __future__ import annotations

import sys

import click

from hypha_celery.config import EX_CONFIG, load_config
from hypha_celery.errors import ConfigError

__all__ = ["check_config"]


@click.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--host/--no-host", default=True, help="Also check that this machine can honour it.")
def check_config(path: str, host: bool) -> None:
    """Validate a worker config file (exit 78 with the bad key on error)."""
    from hypha_celery.worker.hostcheck import check_host

    try:
        cfg = load_config(path)
        if host:
            check_host(cfg)
    except ConfigError as exc:
        click.echo(f"hypha-celery: config error: {exc}", err=True)
        sys.exit(EX_CONFIG)
    click.echo(f"{path}: ok")
