"""Tuned recipes applied to a base model.

`plant_edit`: a planted low-rank change with known layer, site, rank and directions (the known-answer check).
`finetune`: a real, short, narrow gradient fine-tune of chosen decoder blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site, find_blocks, model_width, site_module
from mechdiff.model.tokens import pad_id, right_pad

EDIT_KINDS = ("attn_out", "mlp_out", "resid_post", "resid_pre")


# --------------------------------------------------------------------------------------------- edit recipe


@dataclass
class EditInfo:
    """A planted low-rank change: out' = out (I + scale U U^T) at a site's output projection."""

    layer: int
    kind: str
    rank: int
    scale: float
    seed: int
    directions: np.ndarray  # (d, rank) orthonormal columns: the planted output directions

    def to_json(self) -> dict:
        """JSON-ready dict (directions as nested lists)."""
        return {
            "layer": int(self.layer), "kind": self.kind, "rank": int(self.rank), "scale": float(self.scale),
            "seed": int(self.seed), "directions": np.asarray(self.directions, dtype=np.float64).tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> EditInfo:
        """Inverse of `to_json`."""
        return cls(int(d["layer"]), str(d["kind"]), int(d["rank"]), float(d["scale"]), int(d["seed"]),
                   np.asarray(d["directions"], dtype=np.float64))


def random_directions(d: int, rank: int, seed: int) -> np.ndarray:
    """A seeded random (d, rank) matrix with orthonormal columns (QR of a Gaussian)."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return (q * sign[None, :]).numpy()


def _is_out_linear(m: nn.Module, d: int) -> bool:
    if isinstance(m, nn.Linear):
        return m.out_features == d
    w = getattr(m, "weight", None)  # GPT-2 style Conv1D stores (d_in, d_out)
    return type(m).__name__ == "Conv1D" and w is not None and w.dim() == 2 and w.shape[1] == d


def output_projection(module: nn.Module, d: int, what: str) -> nn.Module:
    """The last Linear (or Conv1D) of `module` whose output width is `d`."""
    found = [m for m in module.modules() if _is_out_linear(m, d)]
    if not found:
        raise MechdiffError(f"{what} module {type(module).__name__} has no linear layer with {d} outputs to edit")
    return found[-1]


@torch.no_grad()
def plant_edit(model: nn.Module, *, layer: int, kind: str, rank: int, scale: float, seed: int) -> EditInfo:
    """Plant out' = out (I + scale U U^T) in place at a site (U seeded random orthonormal, d x rank)."""
    if kind not in EDIT_KINDS:
        raise MechdiffError(f"pair.edit.site {kind!r} is not an edit site: use one of {', '.join(EDIT_KINDS)}")
    n = len(find_blocks(model))
    if not isinstance(layer, int | np.integer) or not 0 <= int(layer) < n:
        raise MechdiffError(f"pair.edit.layer {layer} out of range: the model has {n} blocks (0..{n - 1})")
    layer = int(layer)
    d = model_width(model)
    if not isinstance(rank, int | np.integer) or not 1 <= int(rank) <= d:
        raise MechdiffError(f"pair.edit.rank must be an integer in 1..{d} (the model width), got {rank!r}")
    if not np.isfinite(scale) or float(scale) == 0.0:
        raise MechdiffError(f"pair.edit.scale must be a finite non-zero number, got {scale!r}")
    if kind == "resid_pre" and layer == 0:
        raise MechdiffError("cannot edit L0.resid_pre (it is the embedding output): raise pair.edit.layer or set pair.edit.site: resid_post")
    target_layer = layer - 1 if kind == "resid_pre" else layer
    target_kind = "attn_out" if kind == "attn_out" else "mlp_out"
    mod = site_module(model, Site(target_layer, target_kind))
    proj = output_projection(mod, d, "attention" if target_kind == "attn_out" else "MLP")
    u = random_directions(d, int(rank), seed)
    w = proj.weight
    U = torch.from_numpy(u).to(torch.float64)
    M = torch.eye(d, dtype=torch.float64) + float(scale) * (U @ U.T)  # (d, d), symmetric
    if isinstance(proj, nn.Linear):  # y = x W^T + b  ->  y M = x (M W)^T + b M
        w.copy_((M @ w.double()).to(w.dtype))
    else:  # Conv1D: y = x W + b, W (d_in, d_out)
        w.copy_((w.double() @ M).to(w.dtype))
    b = getattr(proj, "bias", None)
    if b is not None:
        b.copy_((b.double() @ M).to(b.dtype))
    return EditInfo(layer, kind, int(rank), float(scale), int(seed), u)


# --------------------------------------------------------------------------------------------- finetune recipe


def _encode_texts(tokenizer: Any, texts: list[str], max_len: int) -> list[list[int]]:
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise MechdiffError(f"empty or non-text fine-tune text {t!r}: remove it from the corpus")
        ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        if bos is not None and (not ids or ids[0] != bos):
            ids = [int(bos), *ids]
        ids = ids[:max_len]
        if len(ids) < 2:
            raise MechdiffError(f"fine-tune text {t!r} has fewer than 2 tokens after tokenisation: use longer texts")
        out.append(ids)
    return out


def finetune(
    model: nn.Module, tokenizer: Any, texts: list[str], *, layers: list[int] | None, steps: int, lr: float,
    batch_size: int, max_len: int, seed: int, progress: bool = True,
) -> list[float]:
    """Causal-LM fine-tune in place of the chosen decoder blocks (all if None) on `texts`; returns loss per step."""
    from tqdm.auto import tqdm

    if not texts:
        raise MechdiffError("no fine-tune texts: the training corpus is empty")
    for name, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("max_len", max_len, 2)):
        if not isinstance(v, int | np.integer) or v < lo:
            raise MechdiffError(f"pair.finetune.{name} must be an integer >= {lo}, got {v!r}")
    if not (isinstance(lr, float | int) and np.isfinite(lr) and lr > 0):
        raise MechdiffError(f"pair.finetune.lr must be a positive number, got {lr!r}")
    blocks = find_blocks(model)
    n = len(blocks)
    chosen = list(range(n)) if layers is None else [int(x) for x in layers]
    if not chosen or any(not 0 <= x < n for x in chosen):
        raise MechdiffError(f"pair.finetune.layers {layers} invalid: give block indices in 0..{n - 1} (or null for all)")
    ids = _encode_texts(tokenizer, list(texts), int(max_len))
    pad = pad_id(tokenizer)

    orig_dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    if orig_dtype != torch.float32:
        model.float()
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for i in sorted(set(chosen)):
        for p in blocks[i].parameters():
            p.requires_grad_(True)
            params.append(p)
    opt = torch.optim.AdamW(params, lr=float(lr), weight_decay=0.0)
    losses: list[float] = []
    order: list[int] = []
    model.train()
    try:
        bar = tqdm(range(int(steps)), desc="finetune", disable=not progress, leave=False)
        for _ in bar:
            rows = []
            while len(rows) < batch_size:
                if not order:
                    order = list(rng.permutation(len(ids)))
                rows.append(int(order.pop()))
            x, mask = right_pad([ids[r] for r in rows], pad, device)
            logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
            tgt = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100
            )
            if not torch.isfinite(loss):
                raise MechdiffError(f"finetune loss became {loss.item()} at step {len(losses)}: lower pair.finetune.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.item()))
            if progress:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        if orig_dtype != torch.float32:
            model.to(orig_dtype)
    return losses
