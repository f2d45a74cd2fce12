"""hypha-celery: the worker node of a decentralised ML compute network, on Celery and Redis.

``celery -A hypha_celery worker --hypha-config worker.toml`` runs a worker (Celery finds the
app in :mod:`hypha_celery.celery`); :func:`hypha_celery.client.submit` places and signs a task
from a scheduler. Importing this package does no work: no app, no signal, no connection.
"""

__version__ = "0.1.0"
