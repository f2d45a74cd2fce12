"""Structured output: a generation constrained to JSON, or to a JSON Schema, and checked before it is a result.

``response_format`` (OpenAI's shape) is checked by :mod:`.response_format` (no heavy imports: the worker's
validation stage and its output check use it); :mod:`.grammar` compiles it with llguidance into a per-row
:class:`~.grammar.Constraint` that masks each step's logits, in the executor (the ``[structured]`` extra).
"""
