"""``hypha-celery top``: one frame of the live view, from the registry and the ledger."""

from __future__ import annotations

import time
from typing import Any

from hypha_celery.units import format_size

__all__ = ["render"]


def _bar(used: float, total: float, width: int = 12) -> str:
    filled = 0 if total <= 0 else round(width * min(1.0, used / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render(workers: list[dict[str, Any]], registry: str) -> str:
    lines = [f"hypha-celery top - {len(workers)} live worker(s) - registry {registry} - {time.strftime('%H:%M:%S')}", ""]
    for w in workers:
        cores, free_cores = w.get("cpu_cores", 0), w.get("free_cpu_cores", 0)
        memory, free_memory = w.get("total_memory", 0), w.get("free_memory", 0)
        hits, misses = w.get("cache_hits", 0), w.get("cache_misses", 0)
        rate = f"{100 * hits / (hits + misses):.0f}%" if hits + misses else "-"
        lines.append(f"{w['worker_id']}  node {w.get('node_id', '?')}  queue {w.get('queue', '?')}")
        lines.append(f"  cpu    {_bar(cores - free_cores, cores)} {cores - free_cores:g}/{cores} cores reserved")
        lines.append(f"  memory {_bar(memory - free_memory, memory)} "
                     f"{format_size(memory - free_memory)}/{format_size(memory)} reserved")
        for gpu in w.get("gpus", []):
            free = w.get("free_gpu_memory", {}).get(str(gpu["index"]), gpu["memory"])
            lines.append(f"  gpu{gpu['index']}   {_bar(gpu['memory'] - free, gpu['memory'])} "
                         f"{format_size(gpu['memory'] - free)}/{format_size(gpu['memory'])} {gpu['model']}")
        for device, kv in sorted((w.get("kv") or {}).items()):  # generations' KV caches, admitted by the ledger
            used, budget = int(kv.get("used", 0)), max(0, int(kv.get("budget", 0)))
            lines.append(f"  kv {device:<4}{_bar(used, budget)} {format_size(used)}/{format_size(budget)} "
                         f"({len(kv.get('holders') or [])} requests)")
        lines.append(f"  active leases {w.get('leases', 0)}   cache hit rate {rate} ({hits} hits, {misses} misses)"
                     f"   models {len(w.get('models', []))}")
        lines.append("")
    return "\n".join(lines)
