"""Models and data sets: manifests, the store and its sources, the byte-bounded cache (runtimes: :mod:`hypha_celery.runtimes`)."""
