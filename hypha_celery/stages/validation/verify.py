"""``hypha.verify``'s arguments: the model, the prompt (or messages) the client sent, and the generation's ``proof``.

The prompt is held to what ``hypha.generate`` takes (:mod:`hypha_celery.stages.validation.generate`); the proof
is parsed here (:class:`~hypha_celery.runtimes.proofs.Proof`) and may cover no more tokens than this worker would
generate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import InvalidInput
from hypha_celery.manifest import Manifest, validate_model_id
from hypha_celery.models.store import ModelStore
from hypha_celery.resources.requirements import Requirements
from hypha_celery.runtimes.proofs import Proof, ProofFormatError
from hypha_celery.stages.validation.arguments import Arg, TaskArgs, check_arguments
from hypha_celery.stages.validation.common import MODEL, REQUIREMENTS, local_manifest, requirements_for
from hypha_celery.stages.validation.generate import (
    MESSAGES,
    PROMPT,
    PROMPT_OR_MESSAGES,
    check_generate_model,
    check_prompt_bytes,
    prompt_or_messages,
)

__all__ = ["VerifySpec", "validate_verify"]

# The proof's content is checked by Proof.from_json (InvalidInput).
ARGS = TaskArgs("hypha.verify", (MODEL, PROMPT, MESSAGES, Arg("proof", required=True), REQUIREMENTS),
                one_of=(PROMPT_OR_MESSAGES,))


@dataclass(frozen=True)
class VerifySpec:
    model: str
    requirements: Requirements
    manifest: Manifest | None
    proof: Proof
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None


def validate_verify(cfg: WorkerConfig, store: ModelStore, args: Sequence[Any], kwargs: Mapping[str, Any]) -> VerifySpec:
    """``hypha.verify``: the model, the prompt (or messages) the client sent, and the generation's ``proof``."""
    values = check_arguments(ARGS, args, kwargs)
    model = validate_model_id(kwargs["model"])
    requirements = requirements_for(cfg, kwargs.get("requirements"), sizable=True)
    prompt, messages = prompt_or_messages(values, cfg.security.max_input_bytes)
    try:
        proof = Proof.from_json(kwargs["proof"])
    except ProofFormatError as exc:
        raise InvalidInput(str(exc)) from None
    if len(proof.tokens) > cfg.generation.max_new_tokens:
        raise InvalidInput(f"the proof covers {len(proof.tokens)} tokens, above this worker's max_new_tokens "
                           f"({cfg.generation.max_new_tokens})")
    manifest = local_manifest(store, model)
    if manifest is not None:
        check_generate_model(store, manifest, messages is not None)
    check_prompt_bytes(prompt, messages, manifest, cfg.security.max_text_bytes)
    return VerifySpec(model=model, requirements=requirements, manifest=manifest, proof=proof, prompt=prompt,
                      messages=messages)
