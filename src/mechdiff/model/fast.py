"""Inference-time CPU kernels for a loaded model, for the rest of its life (the stages' forwards).

`pack_for_inference` applies `mechdiff.model.kernels.packed_linears` to a model's decoder body and LM head and
keeps it in place: every CPU `nn.Linear` then runs on a oneDNN weight packed once (and gated SiLU MLPs as two fused calls)
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


def pack_for_inference(model: nn.Module, *, rows_hint: int = 1024, avx512_fp32: bool = True) -> nn.Module:
    """Pack `model`'s CPU linear layers once for the model's lifetime; return it (a no-op off CPU or if packed).

    The decoder body packs by `kernels.use_packed`; `avx512_fp32=False` keeps its fp32 calls on the plain BLAS
    where that runs AVX-512 kernels (Intel AVX-512: the stage's numbers exactly as unpacked). The LM head (an
    `nn.Linear`, vocabulary x width: the largest matmul of a scoring forward) always packs that way: oneDNN
    where the BLAS runs AVX2 code (AVX2 CPUs, AMD's AVX-512 CPUs under MKL: ~2x there) and in bf16, the plain
    BLAS call on Intel AVX-512 in fp32."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or getattr(model, "_mechdiff_packed", None) is not None:
        return model
    stack = contextlib.ExitStack()
    n = stack.enter_context(packed_linears(get_body(model), rows_hint=rows_hint, avx512_fp32=avx512_fp32))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is nn.Linear:
        n += stack.enter_context(packed_linears(head, rows_hint=rows_hint, avx512_fp32=False))
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
