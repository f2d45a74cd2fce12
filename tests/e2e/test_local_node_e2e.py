"""``local_node()``: the one way the demo, gpu-check, the tests and bench start a node, and stop it."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from hypha_celery.harness.local_node import hostname, local_node
from tests.conftest import ROOT, worker_config


def test_an_embedded_node_registers_every_worker_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # Given a node of two workers (an empty store) on an embedded Redis, each waited for by its registry record
    (tmp_path / "models").mkdir()
    config = worker_config({"models": {"model_dir": str(tmp_path / "models")}})
    with local_node(tmp_path, config=config, workers=2, wait="registered", cwd=ROOT, name="pair") as node:
        url = node.url
        workers = list(node.workers)
        # Then each has its own name, log and config under the node's folder, and its own registry record
        assert [w.name for w in workers] == ["pair-0", "pair-1"]
        assert all((tmp_path / f"{w.name}.log").is_file() and w.config == tmp_path / f"{w.name}.toml" for w in workers)
        for worker in workers:
            assert node.wait_registered(worker, timeout=5)[0]["worker_id"] == hostname(worker)
        # And it answers a ping through the node's client
        node.wait_answering(workers[1], timeout=30)
    # When the block ends, Then the workers have exited and the embedded Redis is gone
    assert all(not w.alive() for w in workers)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()


def test_a_worker_that_exits_is_reported_and_the_node_still_stops(tmp_path: Path, redis_url: str) -> None:
    # Given a node on a given Redis whose worker cannot start (a config key that does not exist)
    with local_node(tmp_path, redis_url=redis_url, workers=0, cwd=ROOT) as node:
        # When it is started and waited for
        with pytest.raises(RuntimeError, match="exited"):
            node.start_worker({"no_such_key": 1}, name="broken", wait="registered", timeout=60)
        worker = node.workers[0]
    # Then the error says it exited, the node stopped it, and the given Redis is left running
    assert not worker.alive()
    assert redis.Redis.from_url(redis_url).ping()
