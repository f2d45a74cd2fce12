"""Fine-tuning in the executor: ``run.py`` (the entry, :func:`~.run.finetune`), ``data.py``, ``lora.py``,
``loop.py``, ``save.py``. Importing this package imports nothing; its modules import torch."""
