"""``hypha-celery workers``: the live workers the registry lists, as a table or JSON."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from hypha_celery.config import load_config, registry_url
from hypha_celery.errors import HyphaError, RegistryUnavailable
from hypha_celery.units import format_size

__all__ = ["live_workers", "workers"]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--registry", default=None, help="Registry Redis URL (default: $HYPHA_REGISTRY_URL / config).")
def workers(as_json: bool, registry: str | None) -> None:
    """List live workers from the registry."""
    rows = live_workers(registry)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    click.echo(_table(rows))


def live_workers(given: str | None) -> list[dict[str, Any]]:
    from hypha_celery.cli.reach import CONNECT_TIMEOUT_S, unreachable
    from hypha_celery.redis_client import registry_client
    from hypha_celery.registry import list_workers

    url = given or registry_url(load_config())
    try:
        return list_workers(registry_client(url, timeout=CONNECT_TIMEOUT_S))
    except RegistryUnavailable as exc:
        raise click.ClickException(unreachable("registry", url, str(exc).partition(": ")[2] or exc,
                                               "--registry" if given else None)) from None
    except HyphaError as exc:
        raise click.ClickException(str(exc)) from None


def _table(rows: list[dict[str, Any]]) -> str:
    header = f"{'WORKER':32} {'NODE':16} {'CORES':>11} {'MEMORY free/total':>22} {'GPUS':>5} {'MODELS':>6} {'AGE':>6}"
    lines = [header]
    now = time.time()
    for row in rows:
        cores = f"{row.get('free_cpu_cores', 0):g}/{row.get('cpu_cores', 0)}"
        memory = f"{format_size(row.get('free_memory', 0))}/{format_size(row.get('total_memory', 0))}"
        lines.append(
            f"{row['worker_id'][:32]:32} {row.get('node_id', '')[:16]:16} {cores:>11} {memory:>22} "
            f"{len(row.get('gpus', [])):>5} {len(row.get('models', [])):>6} {now - row.get('last_updated', now):>5.0f}s"
        )
    if not rows:
        lines.append("(no live workers)")
    return "\n".join(lines)
