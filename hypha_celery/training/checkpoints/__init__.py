"""Training checkpoints: ``local.py`` (the executor's, under the task id in the model store) and ``sync.py``
(the worker's copies to and from shared storage, so a redelivered copy resumes on any worker)."""
