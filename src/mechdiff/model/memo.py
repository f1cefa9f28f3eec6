"""Tensors kept for reuse within a byte budget: one least-recently-used memo rule for every cache of forward
results (the prefix cache's padded batches and lower blocks, the SAE splices' clean passes)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch


def nbytes(x: Any) -> int:
    """Bytes of the tensors in `x`: a tensor, or a tuple / list / dataclass of them and other things."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, tuple | list):
        return sum(nbytes(y) for y in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return sum(nbytes(getattr(x, f.name)) for f in dataclasses.fields(x))
    return 0


class Memo:
    """A least-recently-used memo of tensors within `budget` bytes: `put` keeps a value (one larger than the
    budget is not kept) and drops the oldest entries beyond the budget; `get` returns a kept value (None when
    none) and marks it recently used. The byte total is kept, not re-summed per insert."""

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._sizes: dict[Any, int] = {}
        self.total = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()

    def __getitem__(self, key: Any) -> Any:
        return self._items[key]

    def get(self, key: Any) -> Any:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: Any, value: Any) -> None:
        n = nbytes(value)
        if key in self._items:
            self.total -= self._sizes.pop(key)
            del self._items[key]
        if n > self.budget:
            return
        self._items[key] = value
        self._sizes[key] = n
        self.total += n
        while self.total > self.budget and len(self._items) > 1:
            old, _ = self._items.popitem(last=False)
            self.total -= self._sizes.pop(old)
