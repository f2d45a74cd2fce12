"""The worker registry in Redis: each worker's record (:mod:`.record`) and its task timings (:mod:`.inference_times`)."""

from __future__ import annotations

from hypha_celery.registry.inference_times import EMA_ALPHA, InferenceTimes
from hypha_celery.registry.record import (
    Published,
    WorkerRecord,
    decode_record,
    deregister,
    encode_record,
    list_workers,
    prune,
    register,
    registered_peer,
)

__all__ = [
    "EMA_ALPHA",
    "InferenceTimes",
    "Published",
    "WorkerRecord",
    "decode_record",
    "deregister",
    "encode_record",
    "list_workers",
    "prune",
    "register",
    "registered_peer",
]
