"""Remote-control commands: ``celery -A hypha_celery inspect hypha_capabilities``."""

from __future__ import annotations

import os
import sys
from typing import Any

from celery.worker.control import inspect_command

from hypha_celery.worker import context as node

__all__ = ["hypha_capabilities"]


@inspect_command()
def hypha_capabilities(state: Any) -> dict[str, Any]:
    """This worker's live capabilities, free resources, and whether its process touched CUDA."""
    ctx = node.context()
    step = getattr(state.consumer, "hypha_registry", None)
    caps = step.capabilities() if step is not None else {}
    usage = ctx.ledger.usage().to_json()
    torch = sys.modules.get("torch")
    return {
        "worker_id": state.consumer.hostname,
        "node_id": ctx.node_id,
        "capabilities": caps,
        "ledger": usage,
        "model_cache": ctx.executors.cache() if "executors" in vars(ctx) else {},
        "process": {
            "pid": os.getpid(),
            "torch_imported": torch is not None,
            "cuda_initialized": bool(torch is not None and torch.cuda.is_initialized()),
        },
    }
