"""Proofs on a loaded transformers model: capture a generation's last hidden states, and replay them.

Both sides read the same tensor: the input of the model's output embeddings (the lm head),
which is the last hidden state after the final norm, at the positions that predicted each
generated token. During ``generate`` a forward pre-hook collects it step by step; a verifier
gets it from ONE forward pass over prompt and generated tokens (``logits_to_keep`` keeps the
lm head to the generated positions). The math is :mod:`.proofs`; generation
(:mod:`.transformers_generation`) captures, ``hypha.infer`` with ``verify`` items replays.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hypha_celery.errors import InvalidInput
from hypha_celery.runtimes import proofs
from hypha_celery.runtimes.transformers_adapters import activate
from hypha_celery.runtimes.transformers_loading import TransformerModel
from hypha_celery.runtimes.transformers_prompts import prompt_ids
from hypha_celery.work import Prompt

__all__ = ["capture", "prove_rows", "verify"]


@contextmanager
def capture(model: TransformerModel) -> Iterator[list[torch.Tensor]]:
    """Collect the lm head's input of every forward pass (``[batch, positions, hidden]`` each) while open."""
    states: list[torch.Tensor] = []
    head = model.module.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _module, args: states.append(args[0].detach()))
    try:
        yield states
    finally:
        handle.remove()


def prove_rows(model: TransformerModel, states: list[torch.Tensor], rows: list[list[int]]) -> list[dict[str, Any]]:
    """One proof per row of a generation batch: ``states`` from :func:`capture` (one per step, the prefill's
    last position first), ``rows`` each row's generated token ids."""
    steps = torch.cat([step[:, -1:, :] for step in states], dim=1)  # [batch, steps, hidden]
    dtype = str(model.module.dtype).removeprefix("torch.")
    out = []
    for row, tokens in enumerate(rows):
        commitments = proofs.commit(steps[row, :len(tokens)])
        out.append(proofs.Proof(tokens=tokens, commitments=commitments, dtype=dtype).to_json())
    return out


def verify(model: TransformerModel, item: dict[str, Any]) -> dict[str, Any]:
    """Replay ``item`` (``prompt`` or ``messages``, and ``proof``) with one prefill: the :class:`proofs.Check`."""
    try:
        proof = proofs.Proof.from_json(item.get("proof"))
    except proofs.ProofFormatError as exc:
        raise InvalidInput(str(exc)) from None
    if (proof.k, proof.chunk) != (proofs.TOP_K, proofs.CHUNK):  # a prover does not choose how much it commits
        return proofs.Check(False, f"the proof commits k={proof.k} per chunk of {proof.chunk} tokens; this verifier "
                                   f"checks k={proofs.TOP_K} per {proofs.CHUNK}", {"chunks": 0}).to_json()
    tokens = proof.tokens
    ids = prompt_ids(model, Prompt(prompt=item.get("prompt"), messages=item.get("messages")), len(tokens))
    vocab = model.module.get_output_embeddings().weight.shape[0]
    if max(tokens) >= vocab:
        return proofs.Check(False, f"a generated token id is outside the model's vocabulary ({vocab})",
                            {"chunks": 0}).to_json()
    activate(model)
    with capture(model) as states, torch.inference_mode():
        model.module(input_ids=torch.tensor([ids + tokens[:-1]], device=model.device), logits_to_keep=len(tokens))
    hidden = states[-1][0, -len(tokens):].float().cpu()
    return proofs.check(hidden, proof.commitments, k=proof.k, chunk=proof.chunk).to_json()
