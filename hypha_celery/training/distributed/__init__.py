"""DiLoCo: one model trained on many workers in rounds of inner tasks and an outer step.

``layout.py`` (every shared-storage key of a job), ``deltas.py`` (the arithmetic on safetensors files),
``compression.py`` (bf16 / int8 deltas, their checked decoders, error feedback), ``timebox.py`` (time-boxed
rounds' weights),
``inner.py`` (``hypha.train`` with a ``diloco`` block), ``outer.py`` (``hypha.aggregate`` on the worker),
``apply.py`` (the outer step in a job executor, under the lease's memory cap), ``weights.py`` (a checkpoint's
tensors in one file, a sharded index's shards or an adapter's, read one tensor at a time),
``membership.py`` (who trains a round: the live workers, the shards round-robin), ``rounds.py`` (what a
round did, as the scheduler shows it), ``scheduler.py`` (the scheduler's side:
:func:`hypha_celery.training.diloco`). The package is not named ``diloco``: that name is the public
function :func:`hypha_celery.training.diloco`, which a subpackage of the same name would shadow once
imported.
"""
