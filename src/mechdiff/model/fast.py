"""Inference-time CPU kernels for a loaded model, for the rest of its life (the stages' forwards).

`pack_for_inference` applies `mechdiff.model.kernels.packed_linears` to a model's decoder body and keeps it in
place: every CPU `nn.Linear` then runs on a oneDNN weight packed once (and gated SiLU MLPs as two fused calls)
in every later no-grad forward: patching, the layer patch, SAE splicing, steering, generation, head patching.
Each call takes the packed or the plain path by the CPU-kind rule `kernels.use_packed`. Forwards with
gradients (head attribution, fine-tuning) and other devices fall back to the plain layers, and hooks on the
blocks, attention and MLP modules still see their outputs. Same dtype as the model: results differ from the
plain path only by summation order (~1e-6 relative).
"""

from __future__ import annotations

import contextlib

from torch import nn

from mechdiff.model.kernels import packed_linears, warm_up
from mechdiff.model.sites import get_body


def pack_for_inference(model: nn.Module, *, rows_hint: int = 1024) -> nn.Module:
    """Pack `model`'s CPU linear layers once for the model's lifetime; return it (a no-op off CPU or if packed)."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or getattr(model, "_mechdiff_packed", None) is not None:
        return model
    stack = contextlib.ExitStack()
    n = stack.enter_context(packed_linears(get_body(model), rows_hint=rows_hint))
    model._mechdiff_packed = stack  # closing it restores the plain layers
    if n:
        warm_up(model)
    return model


def unpack(model: nn.Module) -> nn.Module:
    """Undo `pack_for_inference` (before training or editing the weights in place)."""
    stack = model.__dict__.pop("_mechdiff_packed", None)
    if stack is not None:
        stack.close()
    return model


__all__ = ["pack_for_inference", "unpack"]
