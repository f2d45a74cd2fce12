"""Runtimes: the code that runs a stored model inside an executor, one module per kind of model.

:mod:`.registry` picks a manifest's runtime and imports it when first used
(:mod:`.builtin` torch, :mod:`.transformers`, :mod:`.onnx`); :mod:`.codec` is
the tensor payload they share; :mod:`.proofs` is the pure math of checkable
generations. Importing this package does no work.
"""
