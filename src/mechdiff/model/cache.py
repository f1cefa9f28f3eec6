"""The transformers KV cache, one way: a new DynamicCache for a model, and the (keys, values) of each layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mechdiff.errors import MechdiffError


class UnknownCacheLayout(MechdiffError):
    """The installed transformers keeps its KV cache in a layout this module does not read."""


def cache_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of a transformers KV cache (either layout)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(ly.keys, ly.values) for ly in layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    raise UnknownCacheLayout(f"unknown KV cache layout {type(cache).__name__}: run without a prefix cache")


def empty_cache(model: nn.Module):
    """A new DynamicCache for the model (configured by its config where the installed transformers allows)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()
