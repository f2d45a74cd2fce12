"""``hypha-celery datasets``: training data sets written into the store, for ``hypha.train data={"ref": ID}``."""

from __future__ import annotations

import json

import click

from hypha_celery.cli.models import open_store
from hypha_celery.errors import HyphaError

__all__ = ["datasets"]


@click.group()
def datasets() -> None:
    """Training data sets in the store (hypha.train data={"ref": ID})."""


@datasets.command("add")
@click.argument("dataset_id")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option("--dir", "directory", default=None, help="Model directory (default: the config's model_dir).")
def datasets_add(dataset_id: str, file: str, directory: str | None) -> None:
    """Store FILE ({"inputs": [...], "targets": [...]}, or {"texts": [...]} with "labels" for a classifier) as DATASET_ID."""
    try:
        with open(file) as handle:
            data = json.load(handle)
        if not isinstance(data, dict):
            raise click.ClickException(f"{file} must hold a JSON object with 'inputs' and 'targets', or 'texts'")
        store = open_store(directory)
        if "texts" in data:
            manifest = store.save_texts(dataset_id, data["texts"], data.get("labels"))
        else:
            manifest = store.save_dataset(dataset_id, data.get("inputs") or [], data.get("targets") or [])
    except (ValueError, HyphaError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{dataset_id}: {manifest.rows} rows, sha256 {manifest.files['data.json'].sha256[:16]}...")
