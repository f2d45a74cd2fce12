"""``python -m hypha_celery.cli``: the ``hypha-celery`` command from a checkout, without the console script."""

import os

from hypha_celery.cli.main import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
main()
