"""The transformers KV cache, one way: a new DynamicCache for a model, and the (keys, values) of each layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mechdiff.errors import MechdiffError


class UnknownCacheLayout(MechdiffError):
    """The installed transformers keeps its KV cache in a layout this module does not read."""


class CacheMismatch(MechdiffError):
    """A forward continued from a KV cache differs from the full forward beyond `cache_check`'s tolerance."""


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


def prefilled_cache(model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int | None = None):
    """A new DynamicCache whose layer i starts from `kv[i]`'s first `length` slots, without copying them.

    Filling a cache through `update` copies every layer (a concatenation onto an empty tensor), and the next
    forward copies it again to append. Here each plain `DynamicLayer` holds views of the given tensors, which are
    never written: a forward appends by concatenation (a new tensor), except a one-token forward on a layer whose
    tensors have a spare slot at index `length` (`kv[i]` longer than `length`): that token's keys and values are
    written into the slot in place and the layer attends over the `length + 1` slots, with no copy at all (the
    caller owns that slot and must not need what it held). Layers of other kinds, or a cache made without the
    model's config, are filled through `update` as usual.
    """
    from transformers.cache_utils import DynamicLayer

    cache = empty_cache(model)
    layers = getattr(cache, "layers", None)
    for li, (k, v) in enumerate(kv):
        n = k.shape[-2] if length is None else int(length)
        if layers is None or li >= len(layers) or type(layers[li]) is not DynamicLayer:
            cache.update(k[:, :, :n], v[:, :, :n], li)
            continue
        ly = layers[li]
        ly.lazy_initialization(k, v)
        ly.keys, ly.values = k[:, :, :n], v[:, :, :n]
        if k.shape[-2] > n and k.stride(0) != 0:
            ly.update = _slot_update(ly, k, v, n)
    return cache


def expanded_cache(model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
    """`prefilled_cache` of `batch` rows that all start from the one-row keys and values `kv` (views, not copies)."""
    return prefilled_cache(model, [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])


def filled_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of the layers a forward filled: a forward that stopped early leaves the layers after its
    last block empty; an empty layer before a filled one is a layout mechdiff does not continue."""
    kv = cache_kv(cache)
    n = sum(1 for k, _ in kv if k is not None and k.numel())
    if any(k is None or not k.numel() for k, _ in kv[:n]):
        raise UnknownCacheLayout("a KV cache with an empty layer between filled ones: run without a prefix cache")
    return kv[:n]


def _slot_update(layer: Any, k: torch.Tensor, v: torch.Tensor, n: int):
    """`DynamicLayer.update` of `layer`, writing a first one-token update into slot `n` of k / v in place."""
    from transformers.cache_utils import DynamicLayer

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[-2] != 1 or layer.keys.shape[-2] != n or key_states.shape[0] != k.shape[0]:
            return DynamicLayer.update(layer, key_states, value_states, *args, **kwargs)
        k[:, :, n : n + 1].copy_(key_states)
        v[:, :, n : n + 1].copy_(value_states)
        layer.keys, layer.values = k[:, :, : n + 1], v[:, :, : n + 1]
        return layer.keys, layer.values

    return update


def cache_check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(relative error, tolerance) of outputs computed on a KV cache against a full forward's:
    ||got - want|| / ||want|| against max(1e-3, 2 x the machine epsilon of the model's dtype). A float32 model
    agrees to ~1e-7; bf16 to ~0.2-0.6 % (two summation orders of a 30-block model) at some sites, but 2.3-2.9 %
    at SmolLM2's L20.attn_out (extraction's check, on AMX and AVX512-BF16 CPUs alike; 2.5 % on the logits of an
    AVX512-BF16 one), while a cache off by one position misses by ~5 %: so a bf16 / fp16 extraction checks its
    cache on a float32 copy (`sites.SharedPrefix.checked(check_model=)`)."""
    err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return err, max(1e-3, 2.0 * eps)


def sliding_window(model: nn.Module) -> int | None:
    """The model's attention window in tokens when any of its layers attends through a sliding window (Mistral,
    Gemma 2 / 3, Qwen2 with `use_sliding_window`), else None: from its (text) config."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    text = getattr(cfg, "get_text_config", None)
    cfg = text() if callable(text) else cfg
    w = getattr(cfg, "sliding_window", None)
    if isinstance(w, bool) or not isinstance(w, int) or w <= 0 or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None and not any("sliding" in str(t) for t in types):
        return None
    return w


def fits_window(model: nn.Module, slots: int) -> bool:
    """Whether a cache of `slots` positions (prefix, padding and what is appended) stays inside the model's
    sliding window, with a slot to spare (transformers keeps window - 1 of them): a cache whose middle holds
    padding, or which is cut to length from a longer forward, then attends exactly as an unpadded forward would.
    Beyond it a sliding-window layer drops or masks slots by their index, not by the tokens' positions, so the
    callers (the prefix caches of patching and of behaviour scoring) run full forwards instead. Always true for
    models without a sliding window."""
    w = sliding_window(model)
    return w is None or int(slots) < w - 1
