""":mod:`bench.plain_app` on hypha's Redis broker transport (:mod:`hypha_celery.worker.broker`).

Beside it, hypha's no-op shows what admission itself costs, apart from what that transport saves
every task (one redis-py client per pool instead of one per command).
"""

from __future__ import annotations

from bench.plain_app import app
from hypha_celery.worker.broker import TRANSPORT

__all__ = ["app"]

app.conf.broker_transport = TRANSPORT
