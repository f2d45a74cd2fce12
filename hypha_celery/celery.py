"""The Celery application: ``celery -A hypha_celery worker`` finds :data:`app` here.

Celery's ``-A hypha_celery`` lookup tries ``hypha_celery.app``, then this module, so the
package itself stays free of work. Settings come from :mod:`hypha_celery.config.settings`;
an operator's ``celeryconfig`` module, where one is importable (the Celery convention: a
``celeryconfig.py`` in the directory the worker starts in), overrides them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any

from celery import Celery

from hypha_celery.worker.options import install

__all__ = ["OVERRIDES_MODULE", "app", "create_app", "operator_overrides"]

OVERRIDES_MODULE = "celeryconfig"
TASK_MODULES = (
    "hypha_celery.tasks.infer", "hypha_celery.tasks.generate", "hypha_celery.tasks.train", "hypha_celery.tasks.noop",
    "hypha_celery.tasks.aggregate", "hypha_celery.tasks.verify",
)


def operator_overrides(module: str = OVERRIDES_MODULE) -> dict[str, Any]:
    """The public settings of an importable ``celeryconfig`` module (``{}`` when there is none)."""
    if importlib.util.find_spec(module) is None:
        return {}
    found = importlib.import_module(module)
    return {
        name: value
        for name, value in vars(found).items()
        if not name.startswith("_") and not inspect.ismodule(value) and not callable(value)
    }


def create_app(*, overrides: str | None = OVERRIDES_MODULE) -> Celery:
    """The hypha Celery app: its settings, worker options, bootsteps and signals."""
    celery = Celery("hypha_celery", include=list(TASK_MODULES))
    celery.config_from_object("hypha_celery.config.settings")
    if overrides:
        celery.conf.update(operator_overrides(overrides))
    install(celery)
    return celery


app = create_app()
