"""A model cache bounded by bytes: LRU, single-flight, and never evicting a model in use.

Triton keeps every loaded model until told otherwise; users ask for LRU
unloading (triton #7279, #3583). Here the bound is the models' real memory
(parameters + buffers on their device), not a count. Two callers asking for
the same cold model share one load. A model a task is using is pinned; if
everything is pinned and a new model does not fit, it is served once without
being cached rather than evicting work in progress. A model larger than the
whole cache is ``ModelTooLarge``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypha_celery.errors import ModelTooLarge
from hypha_celery.units import format_size

__all__ = ["CacheStats", "ModelCache", "Use"]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    uncached: int = 0


@dataclass
class _Entry:
    value: Any
    size: int
    pins: int = 0


@dataclass
class _Loading:
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass(frozen=True)
class Use:
    """What ``ModelCache.use`` hands out: the model, and whether this use loaded it."""

    value: Any
    size: int
    hit: bool
    load_s: float


class ModelCache:
    """``loader(key) -> (value, size_bytes)``; ``on_evict(key, value)`` frees device memory."""

    def __init__(
        self,
        capacity: int,
        loader: Callable[[str], tuple[Any, int]],
        *,
        on_evict: Callable[[str, Any], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.capacity = capacity
        self._loader = loader
        self._on_evict = on_evict
        self._clock = clock or time.perf_counter
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._loading: dict[str, _Loading] = {}
        # Reentrant: evicting an adapter releases its base's pin from inside the cache (on_evict under the lock)
        self._lock = threading.RLock()
        self.stats = CacheStats()

    @property
    def used(self) -> int:
        with self._lock:
            return sum(entry.size for entry in self._entries.values())

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {key: entry.size for key, entry in self._entries.items()}

    @contextmanager
    def use(self, key: str, expected_size: int | None = None) -> Iterator[Use]:
        """Pin ``key`` for the duration of the ``with``, loading it if it is cold."""
        use, cached = self._acquire(key, expected_size)
        try:
            yield use
        finally:
            if cached:
                with self._lock:
                    self._entries[key].pins -= 1
            elif self._on_evict is not None:
                self._on_evict(key, use.value)

    def _acquire(self, key: str, expected_size: int | None) -> tuple[Use, bool]:
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.pins += 1
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    return Use(entry.value, entry.size, hit=True, load_s=0.0), True
                loading = self._loading.get(key)
                if loading is None:
                    if expected_size is not None and expected_size > self.capacity:
                        raise self._too_large(key, expected_size)
                    self._make_room(expected_size or 0)
                    self._loading[key] = loading = _Loading()
                    owner = True
                else:
                    owner = False
            if not owner:
                loading.done.wait()
                if loading.error is not None:
                    raise loading.error
                continue  # loaded by another caller: take it as a hit
            return self._load(key, loading)

    def _load(self, key: str, loading: _Loading) -> tuple[Use, bool]:
        started = self._clock()
        try:
            value, size = self._loader(key)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
            loading.error = exc
            loading.done.set()
            raise
        load_s = self._clock() - started
        with self._lock:
            self._loading.pop(key, None)
            self.stats.misses += 1
            if size > self.capacity:
                error: BaseException | None = self._too_large(key, size)
            else:
                error = None
                self._make_room(size)
                if self._used_locked() + size <= self.capacity:
                    self._entries[key] = _Entry(value, size, pins=1)
                    cached = True
                else:
                    self.stats.uncached += 1
                    cached = False
        if error is not None:
            if self._on_evict is not None:
                self._on_evict(key, value)
            loading.error = error
            loading.done.set()
            raise error
        loading.done.set()
        return Use(value, size, hit=False, load_s=load_s), cached

    def _used_locked(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def _make_room(self, size: int) -> None:
        """Evict least-recently-used unpinned models until ``size`` more bytes fit (lock held).

        Passes repeat while one evicts something: evicting an adapter unpins the base it hangs on.
        """
        evicted = True
        while evicted:
            evicted = False
            for key in list(self._entries):
                if self._used_locked() + size <= self.capacity:
                    return
                entry = self._entries.get(key)
                if entry is None or entry.pins:
                    continue
                del self._entries[key]
                self.stats.evictions += 1
                evicted = True
                if self._on_evict is not None:
                    self._on_evict(key, entry.value)

    def _too_large(self, key: str, size: int) -> ModelTooLarge:
        return ModelTooLarge(
            f"model {key!r} needs {format_size(size)}, more than the whole model cache "
            f"({format_size(self.capacity)}, model_cache_size)"
        )
