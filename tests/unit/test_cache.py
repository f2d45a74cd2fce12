"""The model cache as a data structure: bytes-bounded LRU, single-flight, pinning."""

from __future__ import annotations

import threading
import time

import pytest

from hypha_celery.errors import ModelTooLarge
from hypha_celery.models.cache import ModelCache

SIZES = {"a": 40, "b": 40, "c": 40, "huge": 500}


class Loader:
    def __init__(self, delay: float = 0.0) -> None:
        self.loads: list[str] = []
        self.evicted: list[str] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, key: str) -> tuple[object, int]:
        time.sleep(self.delay)
        with self.lock:
            self.loads.append(key)
        return f"model-{key}", SIZES[key]

    def evict(self, key: str, value: object) -> None:
        self.evicted.append(key)


def test_lru_by_bytes() -> None:
    loader = Loader()
    cache = ModelCache(100, loader, on_evict=loader.evict)
    for key in ("a", "b", "a", "c"):  # c needs room: b is least recently used
        with cache.use(key):
            pass
    assert cache.sizes() == {"a": 40, "c": 40} and loader.evicted == ["b"]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 3, 1)
    with cache.use("a") as use:
        assert use.hit and use.load_s == 0.0


def test_single_flight_loads_once() -> None:
    loader = Loader(delay=0.2)
    cache = ModelCache(100, loader)
    hits = []

    def ask() -> None:
        with cache.use("a") as use:
            hits.append(use.hit)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loader.loads == ["a"] and sorted(hits) == [False] + [True] * 7


def test_a_model_in_use_is_not_evicted() -> None:
    loader = Loader()
    cache = ModelCache(100, loader, on_evict=loader.evict)
    with cache.use("a"), cache.use("b"):
        # everything is pinned: c is served once without being cached rather than evicting a or b
        with cache.use("c") as use:
            assert use.value == "model-c"
        assert cache.sizes() == {"a": 40, "b": 40} and cache.stats.uncached == 1
    assert loader.evicted == ["c"]  # the uncached copy is freed after its use


def test_a_model_larger_than_the_cache_is_refused() -> None:
    cache = ModelCache(100, Loader())
    with pytest.raises(ModelTooLarge, match="model_cache_size"):
        with cache.use("huge"):
            pass
    with pytest.raises(ModelTooLarge):
        with cache.use("a", expected_size=101):
            pass
    assert cache.sizes() == {}


def test_a_failed_load_is_reported_to_every_waiter() -> None:
    def broken(key: str) -> tuple[object, int]:
        time.sleep(0.1)
        raise OSError("disk gone")

    cache = ModelCache(100, broken)
    errors = []

    def ask() -> None:
        try:
            with cache.use("a"):
                pass
        except OSError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == ["disk gone"] * 3
