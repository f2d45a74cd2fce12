"""hypha's Celery tasks: ``hypha.infer``, ``hypha.generate``, ``hypha.verify`` (a generation's proof),
``hypha.train``, ``hypha.noop`` and ``hypha.aggregate`` (DiLoCo's outer step).

Every task takes keyword arguments only and goes through
:func:`hypha_celery.tasks.pipeline.run_task`.
"""
