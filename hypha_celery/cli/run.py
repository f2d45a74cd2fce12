"""``hypha-celery run``: send work to the network and print the answer; the options and the submission every
``run`` command shares (``train`` and ``diloco`` live in :mod:`hypha_celery.cli.train`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click

from hypha_celery.errors import HyphaError

__all__ = ["run"]

log = logging.getLogger(__name__)


@click.group()
def run() -> None:
    """Send work to the network and print the answer (for people not writing Python)."""


def _submission(broker: str | None, key: str | None, model_sha256: str | None) -> dict[str, Any]:
    """``submit`` keyword arguments: the app (for ``--broker``), the signing key (``--key``) and the pin."""
    if model_sha256 is not None and key is None:
        raise click.UsageError("--model-sha256 travels in the signed envelope: pass --key too")
    from hypha_celery.cli.reach import Unreachable, check_reachable, cli_app

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
    from celery.exceptions import TimeoutError as NoAnswer

    from hypha_celery.client import stream

    async_result = _submit("hypha.generate", broker, key, model_sha256, model=model, **kwargs)
    shown = ""
    deadline = time.monotonic() + timeout
    try:
        for piece in stream(async_result, timeout=timeout):  # the token stream, as each piece lands
            click.echo(piece, nl=False)
            sys.stdout.flush()
            shown += piece
    except (HyphaError, NoAnswer):
        pass  # the task failed or is late: _result reports it as every command does
    answer = _result(async_result, max(1.0, deadline - time.monotonic()))
    output = answer["output"]
    text = output["text"]
    click.echo(text[len(shown):] if text.startswith(shown) else f"\n{text}")
    usage = output["usage"]
    click.echo(f"[finish_reason={output['finish_reason']} prompt_tokens={usage['prompt_tokens']} "
               f"completion_tokens={usage['completion_tokens']}]", err=True)
    resumed, restarted = answer.get("resumed_from_token"), answer.get("restarted")
    if resumed or restarted:  # its worker died: another continued it (or had to start again)
        how = f"continued from token {resumed}" if resumed else f"restarted: {restarted}"
        click.echo(f"[moved across workers {' -> '.join(map(str, answer.get('workers', [])))}: {how}]", err=True)


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
