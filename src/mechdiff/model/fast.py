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

import torch
from torch import nn

from mechdiff.model.kernels import packed_linears
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
        _warm_up(model, p.device)
    return model


def _warm_up(model: nn.Module, device: torch.device) -> None:
    """One tiny forward right after packing. Without it, the first real forward after the packing's oneDNN
    self-check gave different fp32 logits from every later forward of the same batch in about a third of
    processes (up to 1e-3 absolute on a 608-row batch; a thread-pool start-up effect, not seeded), which made
    e.g. `patch` at a tiny-KL site differ run to run; after this warm-up, 8 of 8 processes agreed bit for bit."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device), use_cache=False)
    except Exception:  # noqa: BLE001 - best effort: a model that cannot take this input still works packed
        pass
    finally:
        model.train(was)


def unpack(model: nn.Module) -> nn.Module:
    """Undo `pack_for_inference` (before training or editing the weights in place)."""
    stack = model.__dict__.pop("_mechdiff_packed", None)
    if stack is not None:
        stack.close()
    return model


__all__ = ["pack_for_inference", "unpack"]
