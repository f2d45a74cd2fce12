"""How a model's files are laid out, one module per format, each owning its import and its checks.

Below ``hypha_celery/models/`` (the store dispatches to a format through :mod:`.registry`) and above
the root contracts (:mod:`hypha_celery.manifest`, the error tree): nothing here imports ``models/``.
"""
