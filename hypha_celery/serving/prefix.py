"""Prompt prefixes' KV kept between requests, so a shared prefix (a system prompt, few-shot examples) is computed once.

Many requests to one model start with the same tokens. Their keys and values at
those positions depend only on those tokens (causal attention; positions counted
from each row's first real token, so left padding does not change them), so a row
whose prompt starts with a cached prefix can copy that KV and prefill only the rest.

The cache holds fixed-size *blocks* of ``block`` prompt tokens, as vLLM's automatic
prefix caching does: a block is keyed by a hash of its tokens and its parent block's
key, so the blocks of all cached prompts form a tree and the longest cached prefix of
a prompt is found by walking its blocks, one dictionary look-up each. A prefix
shorter than a block is never cached. Blocks are evicted least recently used first
under a byte cap given by the caller (KV memory is admitted through the ledger
elsewhere: the caller counts :attr:`PrefixCache.bytes` against its own budget). A block
is always older than its parent in the LRU order (a chain is touched leaf first), so
eviction only ever removes leaves and a cached block's ancestors are always cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PrefixCache"]


@dataclass(eq=False)
class _Block:
    parent: int | None
    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values [heads, block, head_dim]
    bytes: int


class PrefixCache:
    """Blocks of ``block`` prompt tokens' KV, at most ``capacity`` bytes, least recently used evicted first."""

    def __init__(self, capacity: int, block: int = 16) -> None:
        if capacity < 0 or block < 1:
            raise ValueError("a prefix cache needs capacity >= 0 bytes and block >= 1 tokens")
        self.capacity = capacity
        self.block = block
        self.bytes = 0
        self.hits = 0  # prompt tokens served from the cache, over the cache's life
        self.block_bytes: int | None = None  # one block's size, known from the first insert
        self._blocks: OrderedDict[int, _Block] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, prompt: Sequence[int]) -> list[int]:
        """The keys of ``prompt``'s full blocks, first to last (each names its whole prefix, not its block alone)."""
        keys: list[int] = []
        parent: int | None = None
        for start in range(0, len(prompt) - self.block + 1, self.block):
            parent = hash((parent, tuple(prompt[start:start + self.block])))
            keys.append(parent)
        return keys

    @property
    def can_hold_a_block(self) -> bool:
        """Whether a block fits under the cap at all (assumed until the first insert says)."""
        return self.block_bytes is None or self.block_bytes <= self.capacity

    def cached_blocks(self, prompt: Sequence[int], keys: Sequence[int] | None = None) -> int:
        """How many of ``prompt``'s leading blocks are cached (no LRU touch: a look, not a use).

        ``keys``: the prompt's :meth:`keys`, when the caller kept them.
        """
        return len(self._chain(prompt, keys))

    def lookup(self, prompt: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """KV per layer ([heads, n, head_dim]) for the longest cached prefix of ``prompt``, at most ``len - 1`` tokens.

        One token at least is left for the caller to feed: the logits of a prompt's last
        position are what its first generated token is drawn from. None when nothing is cached.
        """
        chain = self._chain(prompt)
        tokens = min(len(chain) * self.block, len(prompt) - 1)
        if tokens < 1:
            return None
        for block in reversed(chain):  # parent last: every block stays older than its parent
            self._touch(block)
        self.hits += tokens
        layers = zip(*(self._blocks[key].layers for key in chain), strict=True)
        return [(torch.cat([k for k, _ in blocks], dim=1)[:, :tokens], torch.cat([v for _, v in blocks], dim=1)[:, :tokens])
                for blocks in layers]

    def insert(self, prompt: Sequence[int], layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
               columns: torch.Tensor) -> None:
        """Cache ``prompt``'s full blocks not cached yet, from one row's KV per layer ([heads, W, head_dim]).

        ``columns`` names the column of ``layers`` that holds each prompt position (a row in a
        padded batch has its prompt split around padding). Blocks are gathered into tensors of
        their own (a view would keep the whole batch cache alive). A block that does not fit
        under the cap, even after evicting every older block, is not cached, nor those after it.
        """
        keys = self.keys(prompt)
        have = self._chain(prompt)
        for key in reversed(have):
            self._touch(key)
        for index in range(len(have), len(keys)):
            start, end = index * self.block, (index + 1) * self.block
            size = sum((k[:, :1].nbytes + v[:, :1].nbytes) * self.block for k, v in layers)
            self.block_bytes = size
            parent = keys[index - 1] if index else None
            if keys[index] in self._blocks or not self._make_room(size, keep=parent):
                return  # a hash collision with another prefix's block (kept), or no room
            where = columns[start:end]
            parts = [(k.index_select(1, where), v.index_select(1, where)) for k, v in layers]
            self._blocks[keys[index]] = _Block(parent, tuple(prompt[start:end]), parts, size)
            self._touch_ancestors(keys[index])
            self.bytes += size

    def clear(self) -> None:
        """Drop every block (the model changed, or its memory is wanted back)."""
        self._blocks.clear()
        self.bytes = 0

    def _chain(self, prompt: Sequence[int], keys: Sequence[int] | None = None) -> list[int]:
        chain: list[int] = []
        for index, key in enumerate(self.keys(prompt) if keys is None else keys):
            block = self._blocks.get(key)
            start = index * self.block
            if block is None or block.parent != (chain[-1] if chain else None) \
                    or block.tokens != tuple(prompt[start:start + self.block]):
                break
            chain.append(key)
        return chain

    def _touch(self, key: int) -> None:
        self._blocks.move_to_end(key)

    def _touch_ancestors(self, key: int) -> None:
        """Make ``key`` the newest block but its ancestors, each newer than its child."""
        self._blocks.move_to_end(key)
        parent = self._blocks[key].parent
        while parent is not None:
            self._blocks.move_to_end(parent)
            parent = self._blocks[parent].parent

    def _make_room(self, size: int, keep: int | None) -> bool:
        """Evict least recently used blocks until ``size`` more bytes fit; never ``keep`` or its ancestors."""
        if size > self.capacity:
            return False
        protected: set[int] = set()
        while keep is not None:
            protected.add(keep)
            keep = self._blocks[keep].parent
        while self.bytes + size > self.capacity:
            victim = next((key for key in self._blocks if key not in protected), None)
            if victim is None:
                return False
            self.bytes -= self._blocks.pop(victim).bytes
        return True
