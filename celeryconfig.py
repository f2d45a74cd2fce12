"""Operator overrides for hypha-celery's Celery settings (the Celery convention).

hypha-celery's own settings live in the package (``hypha_celery/config/settings.py``, each
with why). When a module named ``celeryconfig`` is importable where a worker or scheduler
starts - this file, in the directory you run ``celery -A hypha_celery worker`` from - its
public names override those settings, e.g. ``result_expires = 3600`` or
``broker_transport_options = {...}``. Nothing is overridden here: an empty file changes nothing.
The installed package never needs this file.
"""
