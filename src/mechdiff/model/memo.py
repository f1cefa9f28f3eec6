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


def keep(memo: OrderedDict, key: Any, value: Any, budget: int) -> None:
    """Keep `value` under `key` in the least-recently-used `memo`, dropping the oldest entries beyond `budget`
    bytes (an entry larger than the budget is not kept)."""
    if nbytes(value) > budget:
        return
    memo[key] = value
    memo.move_to_end(key)
    total = sum(nbytes(v) for v in memo.values())
    while total > budget and len(memo) > 1:
        _, old = memo.popitem(last=False)
        total -= nbytes(old)
