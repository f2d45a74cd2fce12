"""Operator and developer tools: the ``hypha-celery`` CLI, the demo, an embedded Redis, the worker launcher."""
