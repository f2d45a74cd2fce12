"""How hypha lives inside ``celery worker``: options, bootsteps, the node context, remote control, host checks."""
