"""The Celery application: ``celery -A hypha_celery worker``."""

from __future__ import annotations

from celery import Celery

from .worker_options import install

__all__ = ["app"]

app = Celery(
    "hypha_celery",
    include=["hypha_celery.tasks.infer", "hypha_celery.tasks.train", "hypha_celery.tasks.noop"],
)
app.config_from_object("celeryconfig")
install(app)
