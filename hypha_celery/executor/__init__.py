"""Executor processes: the ML work runs here, spawned fresh, speaking typed JSON lines with the worker."""
