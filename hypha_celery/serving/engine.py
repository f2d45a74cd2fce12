"""The continuous-batching step loop: every step, one decode pass for the running rows, then a prefill chunk.

Static batching (``executor/pool.py`` grouping, ``runtimes/transformers_generation.py``
``generate``) runs a batch until its longest row ends: a short request waits for a
long one, and finished rows keep their slot. Here the batch is re-formed at every
step (iteration-level scheduling, Orca OSDI '22): a request added now joins at a
later step, and a row leaves at the step it finishes (its end-of-sequence token,
its ``max_new_tokens``, a stop string in its decoded text, a cancel, or the end of its
structured-output grammar: a request's ``constraint`` masks its logits, :mod:`.sampling`).

One :meth:`Engine.step`:

1. drops cancelled rows;
2. runs one decode forward over the running rows (:class:`~.kv.BatchKV`: per-row
   caches side by side, left padded, with an attention mask and per-row positions),
   chooses each row's token with its own settings (:mod:`.sampling`), streams it,
   and lets finished rows leave;
3. runs one chunk of prefill for the rows joining: at most ``prefill_budget`` prompt
   tokens (a group of waiting prompts, left padded, fed a slice of columns at a time).
   When the group's prompts are all in, their first tokens are drawn and the group
   merges into the running batch, which it decodes with from the next step.

So prefill is *chunked and interleaved*: a long prompt costs the running rows at
most one budget of tokens per step, never its whole length at once.

Seams for what follows: ``on_join`` is called when a row is taken for prefill (a
ledger reserves :func:`~.request.kv_tokens` times the bytes per token there and may answer
"not yet"), ``on_leave`` once when a joined row leaves (the ledger releases).

Prefix reuse (``prefix_cache_bytes`` > 0, :mod:`.prefix`): when a group's prompts are
all in, their full blocks of ``prefix_block`` tokens are cached; a row taken for
prefill later whose prompt starts with cached blocks gets that KV copied into its
row and prefills only the rest (at least its last token, whose logits it needs).
A waiting row whose next uncached block a row already taken into the group is about
to compute waits for the next group, so concurrent requests sharing a new system
prompt compute it once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hypha_celery.errors import ExecutionError, UnsupportedModel, contained
from hypha_celery.serving.kv import BatchKV, plain_dynamic, positions, prefilled
from hypha_celery.serving.prefix import PrefixCache
from hypha_celery.serving.request import Finish, Handle, Request, State
from hypha_celery.serving.sampling import RowSampler, choose
from hypha_celery.serving.text import cut_at_stop, visible

__all__ = ["Engine", "JoinHook", "LeaveHook"]

# Called when a row is taken for prefill: True lets it join, False keeps it waiting (retried next step);
# raising refuses that row alone (its error is kept on its handle).
JoinHook = Callable[[Handle], bool]
# Called once when a row that joined leaves, for any reason; it must not raise (the step is half done).
LeaveHook = Callable[[Handle], None]


@dataclass(eq=False)
class _Row:
    handle: Handle
    sampler: RowSampler
    ids: list[int]  # what it prefills: its prompt, then any resumed completion
    last: int = -1  # the token to feed at the next decode step
    blocks: list[int] | None = None  # its prompt's prefix-cache block keys, computed once


@dataclass(eq=False)
class _Prefill:
    """A group of joining rows whose prompts enter a cache of their own, ``chunk`` columns per step.

    The cache starts with ``cached`` columns (the rows' reused prefixes, left padded); ``ids`` [B, R]
    are the rest of the prompts, left padded, and ``mask`` [B, cached + R] covers both parts.
    """

    rows: list[_Row]
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: Any
    chunk: int
    cached: int = 0
    done: int = 0


class Engine:
    """Continuous batching over one loaded transformers causal LM and its tokenizer.

    Not thread-safe: one thread calls :meth:`add`, :meth:`cancel` and :meth:`step`
    (the executor's serving loop). ``prefill_budget``: prompt tokens fed per step.
    ``max_rows``: rows decoding together (activation memory per step grows with it).
    ``prefix_cache_bytes``: the most bytes of prompt-prefix KV kept for reuse (0: none; the
    caller counts :attr:`prefix_bytes` against its memory budget), in blocks of ``prefix_block`` tokens.
    """

    def __init__(self, module: Any, tokenizer: Any, *, prefill_budget: int = 256, max_rows: int = 64,
                 on_join: JoinHook | None = None, on_leave: LeaveHook | None = None,
                 prefix_cache_bytes: int = 0, prefix_block: int = 16) -> None:
        config = module.config
        if not plain_dynamic(config):
            raise UnsupportedModel(f"{type(module).__name__}: continuous batching needs full-attention layers "
                                   "(a sliding-window or hybrid cache is not handled)")
        if prefill_budget < 1 or max_rows < 1:
            raise ValueError("prefill_budget and max_rows must be >= 1")
        self.module = module
        self.tokenizer = tokenizer
        self.device = next(module.parameters()).device
        self.prefill_budget = prefill_budget
        self.max_rows = max_rows
        self.on_join = on_join
        self.on_leave = on_leave
        self.vocab_size = int(module.get_input_embeddings().num_embeddings)
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self.eos = _eos_ids(module, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self.pad = int(pad)
        self._ids = 0
        self._waiting: deque[_Row] = deque()
        self._prefill: _Prefill | None = None
        self._running: list[_Row] = []
        self._kv = BatchKV(self.device)
        self._left: list[Handle] = []
        self._rows: dict[int, _Row] = {}  # by handle id, until the row ends
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefix_block) if prefix_cache_bytes > 0 else None

    # -- what callers use ---------------------------------------------------------------------------------------

    def add(self, request: Request) -> Handle:
        """Queue ``request``; it joins at a later step. A bad request is refused here (``InvalidInput``), alone.

        A request with ``resume`` tokens (an earlier run's, on a worker that died) prefills them after its
        prompt and goes on from there: its stop strings are looked for across the seam, its constraint
        and repetition penalty have seen them, and a seeded row's generator continues from ``rng``. One
        whose resumed tokens already end it (its end-of-sequence token, a stop string, its length) is
        done at once, without joining.
        """
        request.check(self.vocab_size, self.max_positions)
        self._ids += 1
        handle = Handle(id=self._ids, request=request, tokens=list(request.resume))
        ids = request.prefill_ids
        sampler = RowSampler(request.sampling, ids, self.device, request.constraint, resumed=len(request.resume),
                             rng=request.rng)
        handle.reseeded = sampler.reseeded
        row = _Row(handle, sampler, ids)
        if request.resume and self._resumed(row):
            return handle
        self._waiting.append(row)
        self._rows[handle.id] = row
        return handle

    def rng_of(self, handle: Handle) -> str | None:
        """A seeded sampled row's generator state now (:func:`~.sampling.rng_record`): what continuing it needs."""
        row = self._rows.get(handle.id)
        return row.sampler.rng() if row is not None else None

    def cancel(self, handle: Handle) -> None:
        """End ``handle`` at the next step (finish ``cancelled``); its tokens so far stay on it."""
        if not handle.done:
            handle.cancelled = True

    @property
    def busy(self) -> bool:
        """Whether any request is waiting, prefilling or decoding."""
        return bool(self._waiting or self._prefill or self._running)

    @property
    def prefix_bytes(self) -> int:
        """Bytes the prefix cache holds now (on the model's device), at most ``prefix_cache_bytes``."""
        return self.prefix_cache.bytes if self.prefix_cache is not None else 0

    def running(self) -> list[Handle]:
        """The rows decoding now, in batch order."""
        return [row.handle for row in self._running]

    def step(self) -> list[Handle]:
        """One decode step for the running rows and one prefill chunk for the joining ones; returns who left."""
        self._left = []
        self._drop_cancelled()
        with torch.inference_mode():
            if self._running:
                self._decode()
            if self._prefill is None:
                self._start_prefill()
            if self._prefill is not None:
                self._prefill_chunk(self._prefill)
        left, self._left = self._left, []
        return left

    def run(self) -> None:
        """Step until nothing is waiting or running (what a batch caller and the tests use).

        A join hook that keeps answering False while nothing runs keeps this stepping: a serving
        loop that admits through a ledger waits on the ledger instead of calling this.
        """
        while self.busy:
            self.step()

    # -- the step's parts ---------------------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._waiting if r.handle.cancelled]:
            self._waiting.remove(row)
            self._end(row, Finish.CANCELLED, joined=False)
        keep = [i for i, row in enumerate(self._running) if not row.handle.cancelled]
        if len(keep) < len(self._running):
            for row in self._running:
                if row.handle.cancelled:
                    self._end(row, Finish.CANCELLED)
            self._kv.keep(keep)
            self._running = [self._running[i] for i in keep]

    def _decode(self) -> None:
        rows = self._running
        ids = torch.tensor([[row.last] for row in rows], dtype=torch.long, device=self.device)
        position = self._kv.lengths()
        mask = self._kv.grow()
        logits = self._forward(rows, input_ids=ids, attention_mask=mask, position_ids=position,
                               past_key_values=self._kv.cache)
        tokens = choose(logits, [row.sampler for row in rows])
        keep = [i for i, (row, token) in enumerate(zip(rows, tokens, strict=True)) if self._produced(row, token)]
        self._kv.keep(keep)
        self._running = [rows[i] for i in keep]

    def _start_prefill(self) -> None:
        """Take waiting rows (in order) into a prefill group, as many as the batch has room for.

        A row whose prompt starts with cached blocks skips them; one whose next uncached block
        a row taken before it will compute waits for the next group, which then reuses it.
        """
        from transformers.cache_utils import DynamicCache

        room = self.max_rows - len(self._running)
        taken: list[_Row] = []
        deferred: list[_Row] = []
        computing: set[int] = set()  # prefix blocks the rows taken so far compute in this group
        while self._waiting and len(taken) < room:
            row = self._waiting.popleft()
            fresh = self._uncached_blocks(row)
            if fresh and fresh[0] in computing:
                deferred.append(row)
            elif self._admit(row):
                taken.append(row)
                computing.update(fresh)
            elif not row.handle.done:
                deferred.append(row)
        self._waiting.extendleft(reversed(deferred))
        if not taken:
            return
        prompts = [row.ids for row in taken]
        reused = self._cached_prefixes(prompts)
        skip = [int(r[0][0].shape[1]) if r is not None else 0 for r in reused]
        cached = max(skip)
        rests = [p[n:] for p, n in zip(prompts, skip, strict=True)]
        width = max(len(r) for r in rests)
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rests], dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (cached - n) + [1] * n + [0] * (width - len(r)) + [1] * len(r)
                             for n, r in zip(skip, rests, strict=True)], dtype=torch.long, device=self.device)
        for row, n in zip(taken, skip, strict=True):
            row.handle.state = State.PREFILL
            row.handle.cached_tokens = n
        cache = prefilled(reused, self.module.config) if cached else DynamicCache(config=self.module.config)
        self._prefill = _Prefill(rows=taken, ids=ids, mask=mask, positions=positions(mask)[:, cached:], cache=cache,
                                 chunk=max(1, self.prefill_budget // len(taken)), cached=cached)

    def _uncached_blocks(self, row: _Row) -> list[int]:
        """The keys of ``row``'s prompt blocks that the prefix cache lacks and could take (none without a cache,
        or with one too small for a block: then waiting for a neighbour's blocks would gain nothing)."""
        cache = self.prefix_cache
        if cache is None or not cache.can_hold_a_block:
            return []
        prompt = row.ids
        if row.blocks is None:
            row.blocks = cache.keys(prompt)
        return row.blocks[cache.cached_blocks(prompt, row.blocks):]

    def _cached_prefixes(self, prompts: list[list[int]]) -> list[list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Each prompt's longest cached prefix KV, or None. Reuse is an optimisation: if copying fails (out of
        memory), the cache is emptied and the rows prefill in full."""
        cache = self.prefix_cache
        if cache is not None:
            try:
                return [cache.lookup(p) for p in prompts]
            except Exception:
                cache.clear()
        return [None] * len(prompts)

    def _remember(self, group: _Prefill) -> None:
        """Cache the full blocks of the group's prompts, now all in its cache (a failed copy empties the cache:
        the rows go on without it)."""
        cache = self.prefix_cache
        if cache is None:
            return
        try:
            for index, row in enumerate(group.rows):
                prompt = row.ids
                if len(prompt) >= cache.block:
                    columns = group.mask[index].nonzero().squeeze(-1)
                    cache.insert(prompt, [(layer.keys[index], layer.values[index]) for layer in group.cache.layers],
                                 columns)
        except Exception:
            cache.clear()

    def _admit(self, row: _Row) -> bool:
        if self.on_join is None:
            return True
        try:
            return bool(self.on_join(row.handle))
        except Exception as exc:  # the hook refused this row: it ends alone, its neighbours go on
            self._end(row, Finish.ERROR, error=exc, joined=False)
            return False

    def _prefill_chunk(self, group: _Prefill) -> None:
        end = min(int(group.ids.shape[1]), group.done + group.chunk)
        logits = self._forward(group.rows, input_ids=group.ids[:, group.done:end],
                               attention_mask=group.mask[:, :group.cached + end],
                               position_ids=group.positions[:, group.done:end], past_key_values=group.cache)
        group.done = end
        if end < group.ids.shape[1]:
            return
        self._prefill = None
        self._remember(group)
        tokens = choose(logits, [row.sampler for row in group.rows])
        keep = [i for i, (row, token) in enumerate(zip(group.rows, tokens, strict=True))
                if not row.handle.cancelled and self._produced(row, token)]
        for row in group.rows:
            if row.handle.cancelled and not row.handle.done:
                self._end(row, Finish.CANCELLED)
        if not keep:
            return
        if len(keep) < len(group.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            for layer in group.cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        self._kv.merge(group.cache, group.mask.index_select(0, torch.tensor(keep, device=self.device)))
        for i in keep:
            group.rows[i].handle.state = State.RUNNING
            self._running.append(group.rows[i])

    def _forward(self, rows: Sequence[_Row], **inputs: Any) -> torch.Tensor:
        """One forward pass; its last position's logits [B, V] in float32. A failure fails every row in it."""
        try:
            output = self.module(**inputs, use_cache=True, logits_to_keep=1)
        except BaseException as exc:
            if not contained(exc):
                raise
            error = ExecutionError(f"a forward pass of {len(rows)} row(s) failed: {type(exc).__name__}: {exc}")
            for row in rows:
                self._end(row, Finish.ERROR, error=error)
            if self._prefill is not None and rows is self._prefill.rows:
                self._prefill = None
            else:
                self._running, self._kv = [], BatchKV(self.device)
            raise error from exc
        return output.logits[:, -1, :].float()

    # -- one row's token ----------------------------------------------------------------------------------------

    def _produced(self, row: _Row, token: int) -> bool:
        """Record ``token`` for ``row``, stream it, and end the row if it is done; True while it goes on."""
        handle, request = row.handle, row.handle.request
        handle.tokens.append(token)
        row.last = token
        finish = Finish.STOP if token in self.eos else None
        try:
            row.sampler.note(token)
            if request.constraint is not None and request.constraint.done:
                finish = Finish.STOP  # its grammar is complete: nothing may follow
            if request.stop or request.on_token is not None:
                handle.text, stopped = cut_at_stop(self._decode_text(handle.tokens), request.stop)
                finish = Finish.STOP if stopped else finish
            if finish is None and len(handle.tokens) >= request.max_new_tokens:
                finish = Finish.LENGTH
            if finish is not None:
                handle.text = cut_at_stop(self._decode_text(handle.tokens), request.stop)[0]
            shown = handle.text if finish is not None else visible(handle.text, request.stop)
            delta, handle.emitted = shown[len(handle.emitted):], shown
            if request.on_token is not None:
                request.on_token(handle, token, delta)
        except Exception as exc:  # its grammar, decoding or callback failed: this row ends, its neighbours go on
            self._end(row, Finish.ERROR, error=exc)
            return False
        if finish is not None:
            self._end(row, finish)
            return False
        return True

    def _decode_text(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _resumed(self, row: _Row) -> bool:
        """Take a resumed row's tokens as produced (constraint, text); True if they already end it."""
        handle, request = row.handle, row.handle.request
        if request.constraint is not None:
            for token in request.resume:
                request.constraint.advance(token)
        text, stopped = cut_at_stop(self._decode_text(handle.tokens), request.stop)
        handle.text = text
        handle.emitted = visible(text, request.stop)
        row.last = handle.tokens[-1]
        if stopped or handle.tokens[-1] in self.eos or (request.constraint is not None and request.constraint.done):
            finish = Finish.STOP
        elif len(handle.tokens) >= request.max_new_tokens:
            finish = Finish.LENGTH
        else:
            return False
        handle.emitted = text
        handle.state, handle.finish = State.DONE, finish
        return True

    def _end(self, row: _Row, finish: Finish, *, error: BaseException | None = None, joined: bool = True) -> None:
        handle = row.handle
        handle.state, handle.finish, handle.error = State.DONE, finish, error
        self._rows.pop(handle.id, None)
        self._left.append(handle)
        if joined and self.on_leave is not None:
            self.on_leave(handle)


def _eos_ids(module: Any, tokenizer: Any) -> frozenset[int]:
    """The end-of-sequence ids ``generate`` would stop on: the generation config's, else the tokenizer's."""
    config = getattr(module, "generation_config", None)
    eos: Any = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    values: Iterable[Any] = eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    return frozenset(int(e) for e in values)
