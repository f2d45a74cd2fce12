"""Remote-control commands: ``celery -A hypha_celery inspect hypha_capabilities``.

Imported by the app on both sides (Celery's ``inspect`` CLI checks the command
name), so it imports nothing beyond Celery at module level.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery.worker.control import inspect_command

__all__ = ["hypha_capabilities"]


@inspect_command()
def hypha_capabilities(state: Any) -> dict[str, Any]:
    """This worker's live capabilities, free resources, and whether its process touched CUDA."""
    ctx = state.consumer.controller.hypha
    step = getattr(state.consumer, "hypha_registry", None)
    caps = step.capabilities() if step is not None else {}
    torch = sys.modules.get("torch")
    return {
        "worker_id": state.consumer.hostname,
        "node_id": ctx.node_id,
        "capabilities": caps,
        "ledger": ctx.ledger.usage().to_json(),
        "model_cache": ctx.executors.cache(),
        "process": {
            "pid": os.getpid(),
            "torch_imported": torch is not None,
            "cuda_initialized": bool(torch is not None and torch.cuda.is_initialized()),
        },
    }
