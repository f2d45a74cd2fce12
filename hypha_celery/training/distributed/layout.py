"""Every shared-storage key of a DiLoCo job, and the ids it names, in one place.

The inner tasks write here, the outer step reads and writes here, the scheduler checks the keys its
workers report against it: one module says which key holds what, as :mod:`hypha_celery.keys` does
for Redis. Keys are ``/``-separated model-id components (:mod:`hypha_celery.models.shared_storage`)::

    jobs/<job>/round-<r>/<task>.safetensors  one inner task's pseudo-gradient       (:func:`delta_key`)
    jobs/<job>/round-<r>/aggregate.json      round r's outcome, written last        (:func:`record_key`)
    jobs/<job>/momentum-<r>.safetensors      the outer momentum after round r       (:func:`momentum_key`)
    jobs/<job>/momentum-<r>/<file>           the same for a sharded model or an adapter: one file per
                                             weight file of the base (a shard, adapter_model.safetensors)
    models/<job>-v<r>/<file>                 the global version round r publishes  (:func:`version_key`),
                                             its manifest last; the storage doubles as a model source

A training task's checkpoints live beside them under ``checkpoints/<task>/``
(:mod:`hypha_celery.training.checkpoints.sync`, which owns that part of the layout).
"""

from __future__ import annotations

from hypha_celery.manifest import SAFETENSORS_SINGLE
from hypha_celery.models.shared_storage import MODELS

__all__ = ["DELTA_SUFFIX", "JOBS", "delta_key", "delta_task", "momentum_key", "record_key", "round_prefix",
           "trained_id", "version_id", "version_key"]

JOBS = "jobs"
DELTA_SUFFIX = ".safetensors"
RECORD = "aggregate.json"


def round_prefix(job: str, round_: int) -> str:
    """The folder of round ``round_`` of ``job``: its deltas and its record."""
    return f"{JOBS}/{job}/round-{round_}/"


def delta_key(job: str, round_: int, task_id: str) -> str:
    """Where inner task ``task_id`` of the round writes its pseudo-gradient."""
    return f"{round_prefix(job, round_)}{task_id}{DELTA_SUFFIX}"


def delta_task(job: str, round_: int, key: object) -> str | None:
    """The inner task id a delta key names, or None unless ``key`` is ``<task id>.safetensors`` in this round's
    folder (no deeper folder): a worker's report names the key, and a key elsewhere is refused."""
    prefix = round_prefix(job, round_)
    if not isinstance(key, str) or not key.startswith(prefix) or not key.endswith(DELTA_SUFFIX):
        return None
    task_id = key[len(prefix):-len(DELTA_SUFFIX)]
    return None if "/" in task_id else task_id


def record_key(job: str, round_: int) -> str:
    """The round's outcome, written last by the outer step: a re-run answers from it."""
    return f"{round_prefix(job, round_)}{RECORD}"


def momentum_key(job: str, round_: int, file: str = SAFETENSORS_SINGLE) -> str:
    """The outer Nesterov momentum after round ``round_`` for the base's weight file ``file``, read by the next
    round's outer step (one key for a one-file model, as before; a folder of one file per shard otherwise)."""
    if file == SAFETENSORS_SINGLE:
        return f"{JOBS}/{job}/momentum-{round_}{DELTA_SUFFIX}"
    return f"{JOBS}/{job}/momentum-{round_}/{file}"


def version_id(job: str, round_: int) -> str:
    """The global model version a round writes (round 0 is the job's starting model, not named so)."""
    return f"{job}-v{round_}"


def version_key(model_id: str, name: str) -> str:
    """File ``name`` of a published global version, where workers fetch it as from any model source."""
    return f"{MODELS}/{model_id}/{name}"


def trained_id(job: str, round_: int, task_id: str) -> str:
    """The local store id an inner task gives its trained weights (they leave the store once the delta is out)."""
    return f"{job}-r{round_}-{task_id.replace('-', '')[:12]}"
