"""``make bench``: hypha-celery measured against plain Celery and raw Redis, in one run."""
