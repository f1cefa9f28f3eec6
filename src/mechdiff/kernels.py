"""CPU inference kernels: run a model's linear layers on oneDNN weights packed once, instead of re-laid-out per call.

A plain `nn.Linear` on CPU calls a BLAS GEMM that re-packs the weight matrix on every call. oneDNN can pack
a weight once into its blocked layout (`mkldnn._reorder_linear_weight`) and reuse it for every batch; on
the 2-core AVX2 machine this project is measured on, that brings the fp32 matmuls of SmolLM2's blocks from
~150 to ~200 GFLOP/s at batch 16 x 50 tokens. The arithmetic stays in the weight's dtype (fp32 stays fp32;
results differ from the BLAS path only by summation order, ~1e-6 relative). Packing is inference-only (no
autograd through the packed weight) and costs one extra copy of the packed weights while it is active.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = (torch.float32, torch.bfloat16)


def onednn_linear_available() -> bool:
    """True when this torch build can pack linear weights for oneDNN (CPU builds with mkldnn enabled)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (RuntimeError, AttributeError):
        return False


def _pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor | None:
    """The oneDNN-packed copy of `weight`, or None when this build or dtype cannot pack it."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
    except (RuntimeError, NotImplementedError):
        return None


def _packed_forward(packed: torch.Tensor) -> types.FunctionType:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != packed.dtype or torch.is_grad_enabled() or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    return forward


def _agrees(mod: nn.Linear, packed: torch.Tensor) -> bool:
    """Self-check of one packed layer against F.linear on a random input (guards against odd builds)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, mod.in_features, generator=gen).to(mod.weight.dtype)
    with torch.no_grad():
        ref = F.linear(x, mod.weight, mod.bias).float()
        out = torch.ops.mkldnn._linear_pointwise(x, packed, mod.bias, "none", [], "").float()
    tol = 1e-4 if mod.weight.dtype == torch.float32 else 3e-2
    return bool(torch.allclose(out, ref, rtol=tol, atol=tol * float(ref.abs().max().clamp_min(1.0))))


@contextlib.contextmanager
def packed_linears(model: nn.Module, *, rows_hint: int = 1024, enabled: bool = True) -> Iterator[int]:
    """Within the block, every CPU fp32/bf16 `nn.Linear` of `model` runs on a oneDNN-packed weight; yields how many.

    Only used under `torch.no_grad()` / `torch.inference_mode()`; with gradients enabled, on another device
    or another input dtype a layer falls back to `F.linear`. A no-op (yields 0) when disabled or unsupported.
    """
    patched: list[nn.Linear] = []
    try:
        if enabled and onednn_linear_available():
            checked = False
            for mod in model.modules():
                if type(mod) is not nn.Linear or "forward" in mod.__dict__:
                    continue
                w = mod.weight
                if w.device.type != "cpu" or w.dtype not in _DTYPES:
                    continue
                packed = _pack(w, rows_hint)
                if packed is None:
                    break
                if not checked:
                    if not _agrees(mod, packed):
                        break
                    checked = True
                mod.forward = types.MethodType(_packed_forward(packed), mod)
                patched.append(mod)
        yield len(patched)
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)
