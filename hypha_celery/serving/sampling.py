"""Choosing each row's next token from its logits, with that row's own settings and random generator.

A static batch shares one ``GenerationConfig``; here every row may differ, so
the processors transformers' ``generate`` would run are applied per row, in its
order: repetition penalty over the row's prompt and completion, then temperature,
top-k, top-p, then a draw with the row's ``torch.Generator``. Greedy rows are an
argmax over the whole batch at once. A seeded row consumes random numbers from
its own generator only, so what shares its batch cannot change its draws.
A row with a :class:`~.request.Constraint` (structured output) has its logits
masked first, and the constraint advanced with each token it takes.

A seeded row continued on another worker (its earlier worker died) carries its generator's state
after its last token (:func:`rng_record`: the device kind and the state's bytes), so its next draws
are the ones the uninterrupted run would have made. The state is a device kind's own (a CPU
generator's Mersenne Twister, a CUDA generator's Philox seed and offset): on another kind, or when
the record does not restore, the row is seeded afresh from its seed and the seam's token number, so it
goes on deterministically, but not as the uninterrupted run would have.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import torch

from hypha_celery.serving.request import Constraint, Sampling

__all__ = ["MAX_RNG_RECORD", "RowSampler", "choose", "rng_record"]

MAX_RNG_RECORD = 16 * 1024  # characters: a CPU generator's state is 5,056 bytes (6,744 in base64), CUDA's 16


def rng_record(generator: torch.Generator) -> str:
    """``generator``'s state as text: ``<device type>:<base64 of its bytes>``."""
    state = generator.get_state()
    return f"{generator.device.type}:{base64.b64encode(state.numpy().tobytes()).decode()}"


def _restore(generator: torch.Generator, record: str) -> bool:
    """Set ``generator`` to a :func:`rng_record` state; False (``generator`` untouched) unless it is one of its kind."""
    kind, _, encoded = record.partition(":")
    if len(record) > MAX_RNG_RECORD or kind != generator.device.type:
        return False
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return False
    current = generator.get_state()
    if len(raw) != current.numel():
        return False
    try:
        generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    except (RuntimeError, ValueError):
        generator.set_state(current)
        return False
    return True


class RowSampler:
    """One row's settings and generator; its seen ids (prompt + completion) feed the repetition penalty.

    ``resumed``: completion tokens produced before (on another worker) and ``rng`` that run's generator
    state after them; :attr:`reseeded` tells whether the state could not be used.
    """

    def __init__(self, sampling: Sampling, prompt_ids: Sequence[int], device: torch.device,
                 constraint: Constraint | None = None, *, resumed: int = 0, rng: str | None = None) -> None:
        self.sampling = sampling
        self.constraint = constraint
        self.generator: torch.Generator | None = None
        self.reseeded = False
        if sampling.do_sample:
            self.generator = torch.Generator(device=device)
            if sampling.seed is None:
                self.generator.seed()
            elif not resumed:
                self.generator.manual_seed(sampling.seed)
            elif rng is None or not _restore(self.generator, rng):
                self.generator.manual_seed((sampling.seed + resumed) % 2**64)
                self.reseeded = True
        self.seen = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)

    def rng(self) -> str | None:
        """The state a continuation needs: a seeded row's generator's (None for greedy and unseeded rows)."""
        if self.generator is None or self.sampling.seed is None:
            return None
        return rng_record(self.generator)

    def note(self, token: int) -> None:
        """Remember a produced token: the constraint takes it; the repetition penalty's copy (only when one is set)."""
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.sampling.repetition_penalty != 1.0:
            self.seen = torch.cat([self.seen, self.seen.new_tensor([token])])

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        """transformers' ``RepetitionPenaltyLogitsProcessor`` on one row ([V] float logits)."""
        penalty = self.sampling.repetition_penalty
        if penalty == 1.0:
            return logits
        score = logits.gather(0, self.seen)
        score = torch.where(score < 0, score * penalty, score / penalty)
        return logits.scatter(0, self.seen, score)

    def draw(self, logits: torch.Tensor) -> int:
        """Temperature, top-k, top-p (transformers' warpers, same order), then a draw with this row's generator."""
        s = self.sampling
        if s.temperature != 1.0:
            logits = logits / s.temperature
        if s.top_k > 0 and s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            ordered, index = torch.sort(logits, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - s.top_p
            drop[-1] = False  # keep at least one token
            logits = logits.masked_fill(drop.scatter(0, index, drop), float("-inf"))
        probabilities = logits.softmax(-1)
        return int(torch.multinomial(probabilities, 1, generator=self.generator))


def choose(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> list[int]:
    """Each row's next token from ``logits`` [B, V] (float32): greedy rows at once, sampled rows one by one.

    A constrained row's logits are masked first, then penalised (a masked token stays ``-inf``).
    """
    constrained = [i for i, row in enumerate(samplers) if row.constraint is not None]
    penalised = [i for i, row in enumerate(samplers) if row.sampling.repetition_penalty != 1.0]
    if constrained or penalised:
        logits = logits.clone()
        for i in constrained:
            logits[i] = samplers[i].constraint.mask(logits[i])  # type: ignore[union-attr]
        for i in penalised:
            logits[i] = samplers[i].penalise(logits[i])
    tokens = logits.argmax(-1).tolist()
    for i, row in enumerate(samplers):
        if row.sampling.do_sample:
            tokens[i] = row.draw(logits[i])
    return tokens
