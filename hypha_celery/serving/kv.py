"""The running rows' KV caches, held as one left-padded batch so a decode step is one forward pass.

Each row keeps its own keys and values; they live side by side in one
transformers ``DynamicCache`` [B, heads, W, head_dim], each row right-aligned
(left padding) with a mask [B, W] naming its real columns. Joining concatenates
a prefilled group's cache on the batch axis after padding the narrower side on
the left; leaving selects the remaining rows and drops the leading columns that
are padding for every row, so the width follows the longest live row, not the
longest row ever seen. Copies happen only at join and leave; a decode step
appends one column, as ``generate`` does.

Only caches of plain ``DynamicLayer`` s are handled (full attention). A sliding-window
or hybrid model keeps a different layout per layer and is refused by the engine.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BatchKV", "plain_dynamic", "positions"]


def plain_dynamic(config: Any) -> bool:
    """Whether every layer of the model's cache is a plain full-attention ``DynamicLayer``."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as ``generate`` computes them (padding gets 1, never read)."""
    ids = mask.long().cumsum(-1) - 1
    return ids.masked_fill(mask == 0, 1)


def _pad_left(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class BatchKV:
    """The decoding rows' caches, one padded batch; the engine keeps its rows in the same order."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def lengths(self) -> torch.Tensor:
        """Each row's real tokens in the cache: the position its next token takes."""
        return self.mask.sum(-1, keepdim=True)

    def merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append a prefilled group (its cache and its [k, P] mask) as new rows at the end of the batch."""
        if self.cache is None or self.rows == 0:
            self.cache, self.mask = cache, mask
            return
        from transformers.cache_utils import DynamicCache

        width = max(self.width, int(mask.shape[1]))
        mine, theirs = width - self.width, width - int(mask.shape[1])
        layers = []
        for (k1, v1, _), (k2, v2, _) in zip(self.cache, cache, strict=True):
            layers.append((torch.cat([_pad_left(k1, mine, 2), _pad_left(k2, theirs, 2)]),
                           torch.cat([_pad_left(v1, mine, 2), _pad_left(v2, theirs, 2)])))
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([_pad_left(self.mask, mine, 1), _pad_left(mask, theirs, 1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop the columns that are padding in every one of them."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.cache = None
            self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]

    def grow(self) -> torch.Tensor:
        """The mask for a decode step (one real column more per row), kept as the batch's mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask
