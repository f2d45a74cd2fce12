"""What a caller hands the serving engine (:class:`Request`) and what it gets back (:class:`Handle`).

Kept apart from the engine so the admission side (the ledger's KV reservation,
see :func:`kv_tokens`) can size a request without importing torch or the model.
A request is checked here, before it can enter a batch: a bad one is refused alone
(:class:`~hypha_celery.errors.InvalidInput`) instead of failing the forward pass
that its neighbours share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from hypha_celery.errors import InvalidInput

__all__ = ["Constraint", "Finish", "Handle", "Request", "Sampling", "State", "TokenCallback", "kv_bytes_per_token",
           "kv_tokens"]

# Called after each token a row produces: (its handle, the token id, the text that became visible).
TokenCallback = Callable[["Handle", int, str], None]


class Constraint(Protocol):
    """A row's logits mask that moves with its tokens (structured output: :mod:`hypha_celery.structured.grammar`).

    Sampling masks the row's logits with :meth:`mask` before choosing, then hands the chosen token to
    :meth:`advance`; the row finishes (``stop``) once :attr:`done`.
    """

    @property
    def done(self) -> bool: ...

    def mask(self, logits: Any) -> Any: ...

    def advance(self, token: int) -> None: ...


@dataclass(frozen=True)
class Sampling:
    """One row's sampling settings; the same meaning as transformers' ``GenerationConfig`` ones.

    ``top_k`` 0 and ``top_p`` 1.0 turn those filters off. ``seed`` gives the row its own
    ``torch.Generator``, so a seeded row draws the same tokens whatever shares its batch.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        """Refuse settings the logits processing cannot honour (the validation stage checks them first)."""
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InvalidInput(f"temperature must be a finite number > 0, not {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidInput(f"top_p must be in (0, 1], not {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInput(f"top_k must be an integer >= 0, not {self.top_k!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidInput(f"repetition_penalty must be a finite number > 0, not {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidInput(f"seed must be an integer >= 0, not {self.seed!r}")


@dataclass(frozen=True)
class Request:
    """One generation: its prompt's token ids, how many tokens at most, how to sample, where to stop."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    on_token: TokenCallback | None = None
    constraint: Constraint | None = None  # this row's own (stateful) logits mask; None: unconstrained
    tag: Any = None  # the caller's own reference (a task id, a prompt index); the engine never reads it
    # A generation continued from an earlier run (on a worker that died): the completion tokens it had produced,
    # which count towards ``max_new_tokens``, and its row's generator state after them (``rng_record``'s form).
    resume: tuple[int, ...] = ()
    rng: str | None = None

    @property
    def prefill_ids(self) -> list[int]:
        """What enters the cache before the first new token: the prompt, then any resumed completion."""
        return [*self.prompt_ids, *self.resume]

    def check(self, vocab_size: int, max_positions: int | None) -> None:
        """Refuse what would fail (or poison) the shared forward pass: ids outside the vocabulary, too long."""
        ids = self.prompt_ids
        if not ids:
            raise InvalidInput("a prompt needs at least one token")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in ids):
            raise InvalidInput(f"a prompt's token ids must be integers in [0, {vocab_size})")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in self.resume):
            raise InvalidInput(f"a resumed completion's token ids must be integers in [0, {vocab_size})")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be an integer >= 1, not {self.max_new_tokens!r}")
        if len(self.resume) > self.max_new_tokens:
            raise InvalidInput(f"a resumed completion of {len(self.resume)} tokens is longer than max_new_tokens "
                               f"({self.max_new_tokens})")
        if max_positions is not None and len(ids) + self.max_new_tokens > max_positions:
            raise InvalidInput(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({self.max_new_tokens}) "
                               f"exceeds the model's maximum length ({max_positions} tokens)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidInput("stop strings must be non-empty strings")
        self.sampling.check()


def kv_tokens(request: Request) -> int:
    """The most KV-cache positions ``request`` can hold: what a ledger reserves for it at join.

    The batched cache pads rows to one width, so a row may briefly occupy more
    columns; the padding is bounded by the longest row and trimmed as rows leave.
    """
    return len(request.prompt_ids) + request.max_new_tokens


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes one token's keys and values take across the layers of a transformers ``config``."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * int(config.num_hidden_layers) * int(kv_heads) * int(head_dim) * dtype_bytes


class State(Enum):
    """Where a request is: queued, prefilling (its prompt entering the cache), decoding, or done."""

    WAITING = "waiting"
    PREFILL = "prefill"
    RUNNING = "running"
    DONE = "done"


class Finish(Enum):
    """Why a row left: a stop (its end-of-sequence token or a stop string), its length, a cancel, an error."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(eq=False)
class Handle:
    """A request inside the engine: its tokens and text so far, and how it ended.

    ``text`` is the decoded completion cut at the first stop string; ``emitted``
    is what the row's callback has been given, always a prefix of the final text;
    ``cached_tokens`` how many of its prompt tokens' KV came from the prefix cache. A resumed request's
    ``tokens`` start with its ``resume`` ones; ``reseeded``: its generator state could not be restored.
    """

    id: int
    request: Request
    state: State = State.WAITING
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    finish: Finish | None = None
    error: BaseException | None = None
    cancelled: bool = False
    cached_tokens: int = 0
    reseeded: bool = False

    @property
    def done(self) -> bool:
        return self.state is State.DONE
