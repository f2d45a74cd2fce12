"""``hypha-celery gateway``: the OpenAI HTTP API in front of the network (:mod:`hypha_celery.gateway`).

Only the options are read here; the gateway itself lives in :mod:`hypha_celery.gateway`.
"""

from __future__ import annotations

import sys

import click

from hypha_celery.config import EX_CONFIG, load_config
from hypha_celery.errors import ConfigError

__all__ = ["gateway_command"]


@click.command("gateway")
@click.option("--host", default=None, help="Address to listen on (default: [worker.gateway] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: [worker.gateway] port, 8000).")
@click.option("--key", default=None, help="Scheduler key that signs every task the gateway sends.")
@click.option("--api-keys", default=None, help="File of bearer keys, one a line: the key or sha256:<hex> of it.")
@click.option("--config", "config_path", default=None, help="Worker TOML with a [worker.gateway] section.")
def gateway_command(host: str | None, port: int | None, key: str | None, api_keys: str | None,
                    config_path: str | None) -> None:
    """Serve the OpenAI HTTP API (/v1/models, chat/completions, completions, embeddings) in front of the network."""
    from hypha_celery.gateway import GatewaySettings, serve

    try:
        settings = GatewaySettings.of(load_config(config_path).gateway, host=host, port=port, key=key,
                                      api_keys=api_keys)
        serve(settings)
    except ConfigError as exc:
        click.echo(f"hypha-celery: config error: {exc}", err=True)
        sys.exit(EX_CONFIG)
