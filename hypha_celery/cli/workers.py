"""``hypha-celery workers``: the live workers the registry lists, as a table or JSON.

The table's ``KV`` column is the node's KV-cache budget in use over the budget, summed over its
devices, and how many requests hold it; ``--json`` has each device's budget and the tasks holding it.
"""

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
    header = (f"{'WORKER':32} {'NODE':16} {'CORES':>11} {'MEMORY free/total':>22} {'KV used/budget (requests)':>28} "
              f"{'GPUS':>5} {'MODELS':>6} {'AGE':>6}")
    lines = [header]
    now = time.time()
    for row in rows:
        cores = f"{row.get('free_cpu_cores', 0):g}/{row.get('cpu_cores', 0)}"
        memory = f"{format_size(row.get('free_memory', 0))}/{format_size(row.get('total_memory', 0))}"
        lines.append(
            f"{row['worker_id'][:32]:32} {row.get('node_id', '')[:16]:16} {cores:>11} {memory:>22} {_kv(row):>28} "
            f"{len(row.get('gpus', [])):>5} {len(row.get('models', [])):>6} {now - row.get('last_updated', now):>5.0f}s"
        )
    if not rows:
        lines.append("(no live workers)")
    return "\n".join(lines)


def _kv(row: dict[str, Any]) -> str:
    """The node's KV budget in use / in all, over its devices, and the requests holding it ("-" before any)."""
    devices = row.get("kv") or {}
    if not devices:
        return "-"
    used = sum(int(d.get("used", 0)) for d in devices.values())
    budget = sum(max(0, int(d.get("budget", 0))) for d in devices.values())
    holders = sum(len(d.get("holders") or []) for d in devices.values())
    return f"{format_size(used)}/{format_size(budget)} ({holders})"
