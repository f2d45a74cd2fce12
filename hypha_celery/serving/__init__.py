"""Iteration-level (continuous) batching of text generation over a loaded transformers causal LM.

The batch is re-formed at every decode step (Orca, OSDI '22): a request joins at
the next step and leaves at the step it finishes, so a short request never waits
for a long one and a long one never holds the batch. Pure engine: no Celery, no
executor; ``engine.py`` holds the step loop, ``request.py`` what a caller hands in
and gets back, ``sampling.py`` per-row logits processing, ``kv.py`` the batched
per-row KV cache, ``text.py`` stop strings on decoded text. Importing this package
does no work (torch is imported by the modules that need it).
"""
