"""The product CLI, ``hypha-celery``: one module per command group; :mod:`hypha_celery.cli.main` wires them."""
