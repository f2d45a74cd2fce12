"""The developer harness: a local node for the demo, ``make gpu-check``, the tests and ``make bench``; not the product.

Nothing here is part of the worker or of ``hypha-celery``'s API, except the embedded Redis that
``hypha-celery redis`` imports when it runs (the ``[embedded]`` extra).
"""
