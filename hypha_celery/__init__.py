"""hypha-celery: the worker node of a decentralised ML compute network, on Celery and Redis.

``celery -A hypha_celery worker --hypha-config worker.toml`` runs a worker;
:func:`hypha_celery.client.submit` places and signs a task from a scheduler.
"""

from .celery_app import app

__all__ = ["app"]
__version__ = "0.1.0"
