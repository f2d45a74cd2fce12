"""Plain Celery for comparison: the same settings as hypha (hypha_celery.config.settings), a bare no-op task."""

from __future__ import annotations

from celery import Celery

app = Celery("plain")
app.config_from_object("hypha_celery.config.settings")
app.conf.update(task_routes=(), task_default_queue="plain")


@app.task(name="plain.noop")
def noop(**kwargs: object) -> dict[str, object]:
    return {"output": None}
