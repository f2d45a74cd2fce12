"""``hypha-celery keys``: Ed25519 keys for schedulers (signing) and workers (identity)."""

from __future__ import annotations

import click

from hypha_celery.errors import ConfigError

__all__ = ["keys"]


@click.group()
def keys() -> None:
    """Ed25519 keys: a scheduler's signing key, or a worker's identity (identity_key)."""


@keys.command("generate")
@click.argument("path", type=click.Path(dir_okay=False))
def keys_generate(path: str) -> None:
    """Write a new private key to PATH (mode 0600) and print its peer id for allowed_schedulers."""
    from hypha_celery.security import generate_key, peer_id

    try:
        key = generate_key(path)
    except FileExistsError:
        raise click.ClickException(f"{path} exists; refusing to overwrite a key") from None
    click.echo(f"private key: {path} (mode 0600)")
    click.echo(f"peer id:     {peer_id(key.verify_key)}")
    import base64

    click.echo(f"public key:  {base64.b64encode(bytes(key.verify_key)).decode()}")
    click.echo("a scheduler key: add the peer id to [worker.security] allowed_schedulers on each worker; "
               "a worker identity: set [worker.security] identity_key to this file")


@keys.command("show")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
def keys_show(path: str) -> None:
    """Print the peer id of the private key at PATH."""
    from hypha_celery.security import load_signing_key, peer_id

    try:
        click.echo(peer_id(load_signing_key(path).verify_key))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
