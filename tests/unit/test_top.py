"""``hypha-celery top``'s frame (hypha_celery.monitoring.top) from registry rows, without a registry."""

from __future__ import annotations

from hypha_celery.monitoring.top import render


def row(**extra: object) -> dict:
    return {"worker_id": "w0@host", "node_id": "n0", "queue": "hypha.worker.w0@host", "cpu_cores": 2,
            "free_cpu_cores": 1.5, "total_memory": 4 << 30, "free_memory": 3 << 30, "cache_hits": 3,
            "cache_misses": 1, "leases": 2, "models": ["tiny-llama"], **extra}


def test_a_frame_shows_each_workers_reservations_and_hit_rate() -> None:
    frame = render([row()], "redis://r")
    assert "1 live worker(s)" in frame and "w0@host  node n0" in frame
    assert "0.5/2 cores reserved" in frame and "75% (3 hits, 1 misses)" in frame
    assert " kv " not in frame  # no generation has reserved KV on this worker


def test_a_frame_shows_the_kv_budget_in_use_per_device_and_the_requests_holding_it() -> None:
    kv = {"cpu": {"used": 1 << 20, "budget": 4 << 20, "holders": ["t1", "t2"]},
          "cuda:0": {"used": 0, "budget": 8 << 30, "holders": []}}
    frame = render([row(kv=kv)], "redis://r")
    cpu = next(line for line in frame.splitlines() if line.startswith("  kv cpu"))
    assert "[###.........]" in cpu and "(2 requests)" in cpu
    assert any(line.startswith("  kv cuda:0") and "(0 requests)" in line for line in frame.splitlines())
