"""hypha's Celery tasks: ``hypha.infer``, ``hypha.generate``, ``hypha.train`` and ``hypha.noop``.

Every task takes keyword arguments only and goes through
:func:`hypha_celery.tasks.pipeline.run_task`.
"""
