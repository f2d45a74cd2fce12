"""Constrained decoding with llguidance: a response format becomes a per-row logits mask.

A :class:`Grammars` wraps one tokenizer (llguidance reads a fast tokenizer's ``tokenizer.json``; built once per
loaded model, since that costs up to a second for a large vocabulary) and compiles each row's response format
into a :class:`Constraint`: before each token, :meth:`Constraint.mask` sets every token the grammar cannot take
next to ``-inf``; after it, :meth:`Constraint.advance` moves the grammar on. When the grammar is complete and
nothing may follow, :attr:`Constraint.done` is True and the row ends (only end-of-sequence is left allowed).

Used by both generation paths: the continuous-batching engine (``serving.sampling`` masks a row's logits,
``serving.engine`` ends a row that is ``done``) and transformers' own ``generate``
(:class:`ConstraintProcessor`, a ``LogitsProcessor``). Why llguidance: README, "Structured output".
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy
import torch

from hypha_celery.errors import ExecutionError, FeatureUnavailable, UnsupportedModel
from hypha_celery.structured.response_format import grammar_options, schema_of

__all__ = ["Constraint", "ConstraintProcessor", "Grammars"]

_MINUS_INF = float("-inf")


def _llguidance() -> Any:
    try:
        return importlib.import_module("llguidance")
    except ImportError as exc:
        raise FeatureUnavailable("response_format needs the [structured] extra in the executor "
                                 f"(llguidance: {exc}): pip install 'hypha-celery[structured]'") from None


class Grammars:
    """One tokenizer as llguidance reads it; :meth:`constraint` compiles a response format for one row."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> None:
        llguidance = _llguidance()
        hf = importlib.import_module("llguidance.hf")
        self.vocab_size = vocab_size
        self.eos = sorted(set(eos_ids))
        try:
            self._tokenizer = hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=self.eos or None)
        except (ValueError, RuntimeError) as exc:
            raise UnsupportedModel(f"structured output cannot read this model's tokenizer ({exc}); it needs a "
                                   "fast (tokenizer.json) tokenizer") from None
        self._matcher = llguidance.LLMatcher

    def constraint(self, response_format: Mapping[str, Any] | None, device: torch.device) -> Constraint | None:
        """The row's constraint; None for plain text."""
        schema = schema_of(response_format)
        if schema is None:
            return None
        grammar = self._matcher.grammar_from_json_schema(schema, defaults=grammar_options())
        matcher = self._matcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ExecutionError(f"response_format's schema did not compile: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size, self.eos, device)


class Constraint:
    """One row's grammar state: which tokens it may take next, and whether it is complete."""

    def __init__(self, matcher: Any, vocab_size: int, eos: Sequence[int], device: torch.device) -> None:
        self._matcher = matcher
        self._words = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)  # llguidance's bitmask, on the CPU
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)
        self._eos = torch.tensor(list(eos), dtype=torch.long, device=device)
        self.vocab_size = vocab_size
        self.device = device

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow: the row ends here."""
        return bool(self._matcher.is_stopped())

    def refused(self) -> torch.Tensor:
        """The tokens the grammar cannot take next, as a bool [vocab_size] on the row's device.

        llguidance writes a packed bitmask (32 tokens a word) on the CPU: unpacked there with numpy for a CPU
        row (fewer small torch ops: a third of the time), or moved packed and unpacked on the device.
        """
        if self.done:
            refused = torch.ones(self.vocab_size, dtype=torch.bool, device=self.device)
            refused[self._eos] = False
            return refused
        self._matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        if self._matcher.is_error():
            raise ExecutionError(f"structured output's grammar failed: {self._matcher.get_error()}")
        if self.device.type == "cpu":
            bits = numpy.unpackbits(self._words.numpy().view(numpy.uint8), bitorder="little")[:self.vocab_size]
            return torch.from_numpy(bits == 0)
        words = self._words.to(self.device, non_blocking=True)
        return ((words.unsqueeze(-1) >> self._shifts) & 1).flatten()[:self.vocab_size] == 0

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [V] (or [..., V]) with what the grammar cannot take next at ``-inf``."""
        refused = self.refused()
        width = logits.shape[-1]
        if width > self.vocab_size:  # a padded lm head: the tokens past the vocabulary are never allowed
            refused = torch.cat([refused, refused.new_ones(width - self.vocab_size)])
        elif width < self.vocab_size:
            refused = refused[:width]
        return logits.masked_fill(refused, _MINUS_INF)

    def advance(self, token: int) -> None:
        """Take the chosen ``token`` (one the mask allowed); a refused one is an ``ExecutionError``."""
        if self.done:
            return
        if not self._matcher.consume_token(int(token)):
            raise ExecutionError(f"structured output's grammar refused token {token}: {self._matcher.get_error()}")


class ConstraintProcessor:
    """A transformers ``LogitsProcessor`` (duck-typed) for a static batch: each row masked by its constraint.

    ``prompt_width``: the padded prompts' width, so the first call (no token generated yet) advances nothing.
    Rows without a constraint (None) pass unchanged.
    """

    def __init__(self, constraints: Sequence[Constraint | None], prompt_width: int) -> None:
        self.constraints = list(constraints)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = int(input_ids.shape[1]) - self.prompt_width
        rows = [(row, c) for row, c in enumerate(self.constraints) if c is not None]
        if not rows:
            return scores
        scores = scores.clone()
        for row, constraint in rows:
            if generated > 0:
                constraint.advance(int(input_ids[row, -1]))
            scores[row] = constraint.mask(scores[row])
        return scores
