"""SAE evaluation: FVU, L0, dead %, MSE on held-out activations; CE / KL recovered with the reconstruction spliced in."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mechdiff.errors import MechdiffError
from mechdiff.sae.model import TopKSAE
from mechdiff.sites import Site, site_module
from mechdiff.tokens import Encoded, batches


def _as_matrix(X: np.ndarray | torch.Tensor, d: int) -> torch.Tensor:
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(np.asarray(X, dtype=np.float32))
    if not isinstance(X, torch.Tensor):
        raise MechdiffError(f"expected a numpy array of activations, got {type(X).__name__}")
    if X.dim() != 2 or X.shape[1] != d or X.shape[0] == 0:
        raise MechdiffError(f"activations have shape {tuple(X.shape)}, expected (n > 0, {d})")
    X = X.float()
    if not bool(torch.isfinite(X).all()):
        raise MechdiffError("activations contain NaN or inf: check the activation store")
    return X


@torch.no_grad()
def eval_sae(sae: TopKSAE, X: np.ndarray | torch.Tensor, *, batch_size: int = 4096) -> dict:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2, mean L0, dead % (never active on X), MSE per element."""
    X = _as_matrix(X, sae.d_total)
    n = X.shape[0]
    mu = X.double().mean(0)
    sse = 0.0
    sst = float(((X.double() - mu) ** 2).sum())
    l0 = 0.0
    fired = torch.zeros(sae.width, dtype=torch.bool)
    for s in range(0, n, batch_size):
        x = X[s : s + batch_size]
        z = sae.encode(x)
        x_hat = sae.decode(z)
        sse += float(((x_hat.double() - x.double()) ** 2).sum())
        act = z > 0
        l0 += float(act.sum())
        fired |= act.any(0)
    return {
        "fvu": sse / sst if sst > 0 else float("nan"),
        "l0": l0 / n,
        "dead_pct": 100.0 * float((~fired).float().mean()),
        "mse": sse / (n * sae.d_total),
        "n": n,
    }


@contextlib.contextmanager
def _splice(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the site's activation tensor t (B, T, d) becomes fn(t)."""
    mod = site_module(model, site)
    if site.kind == "resid_pre":

        def pre(_m, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        h = mod.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(_m, _args, out):
            if isinstance(out, tuple):
                return (fn(out[0]), *out[1:])
            if isinstance(out, list):
                return [fn(out[0]), *out[1:]]
            return fn(out)

        h = mod.register_forward_hook(post)
    try:
        yield
    finally:
        h.remove()


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def spliced_metrics(model: nn.Module, enc: Encoded, rows: Sequence[int] | np.ndarray, site: Site, sae: TopKSAE,
                    ref_logits: torch.Tensor | np.ndarray | None = None, *, batch_size: int = 8,
                    positions: str = "all", pad: int = 0) -> dict:
    """CE / KL recovered when the SAE reconstruction replaces the site's activation (vs zero-ablation).

    `positions="all"` splices every prompt position but the first (the standard; position 0 is an attention sink
    left out of SAE training); `"decision"` only the decision token.
    CE = mean next-token cross-entropy over the prompt's own tokens (positions 0..len-2; "all" only);
    KL = KL(p_patched || p_ref) at the decision token, p_ref from `ref_logits` (len(rows), V) in the order of
    `rows`, or the clean model's logits when None. recovered = (L_zero - L_sae) / (L_zero - L_clean).
    """
    if positions not in ("all", "decision"):
        raise MechdiffError(f"positions must be 'all' or 'decision', got {positions!r}")
    if sae.n_blocks != 1:
        raise MechdiffError("spliced metrics need a single-model SAE (n_blocks=1); a crosscoder spans two models")
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        raise MechdiffError("no prompts to evaluate the SAE on: the split is empty")
    dev = next(model.parameters()).device
    if ref_logits is not None:
        ref = torch.as_tensor(np.asarray(ref_logits) if isinstance(ref_logits, np.ndarray) else ref_logits).float()
        if ref.dim() != 2 or ref.shape[0] != rows.size:
            raise MechdiffError(f"ref_logits has shape {tuple(ref.shape)}, expected ({rows.size}, vocab)")
        where = {int(r): i for i, r in enumerate(rows)}
    sae_dev = sae.to(dev)

    def recon(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1]).float()
        if flat.shape[1] != sae_dev.d_in:
            raise MechdiffError(f"SAE d_in={sae_dev.d_in} does not match the site width {flat.shape[1]}")
        return sae_dev(flat).reshape(t.shape).to(t.dtype)

    tot = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_clean": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n_tok = 0
    n_rows = 0
    for brows, ids, mask, pos in batches(enc, rows, batch_size, pad, device=dev):
        B = ids.shape[0]
        ar = torch.arange(B, device=dev)

        def make(kind: str, _pos: torch.Tensor = pos, _ar: torch.Tensor = ar) -> Callable:
            def fn(t: torch.Tensor) -> torch.Tensor:
                if positions == "all":  # every position but the first (the attention sink SAEs are not trained on)
                    t = t.clone()
                    t[:, 1:] = recon(t[:, 1:]) if kind == "sae" else 0.0
                    return t
                t = t.clone()
                v = t[_ar, _pos]
                t[_ar, _pos] = recon(v.unsqueeze(1)).squeeze(1) if kind == "sae" else torch.zeros_like(v)
                return t
            return fn

        outs = {}
        outs["clean"] = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        for kind in ("sae", "zero"):
            with _splice(model, site, make(kind)):
                outs[kind] = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        if ref_logits is not None:
            ref_b = ref[[where[int(r)] for r in brows]].to(dev)
        else:
            ref_b = outs["clean"][ar, pos]
        logp_ref = F.log_softmax(ref_b, -1)
        tgt = ids[:, 1:]
        valid = mask[:, 1:].bool() & mask[:, :-1].bool()
        for kind, lg in outs.items():
            lp_dec = F.log_softmax(lg[ar, pos], -1)
            tot[f"kl_{kind}"] += float(_kl_rows(lp_dec, logp_ref).sum())
            ce = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
            tot[f"ce_{kind}"] += float((ce.view_as(tgt) * valid).sum())
        n_tok += int(valid.sum())
        n_rows += B
    res: dict = {}
    for kind in ("clean", "sae", "zero"):
        res[f"kl_{kind}"] = tot[f"kl_{kind}"] / n_rows
        res[f"ce_{kind}"] = tot[f"ce_{kind}"] / n_tok if n_tok else float("nan")

    def rec(zero: float, sae_v: float, clean: float) -> float:
        den = zero - clean
        return (zero - sae_v) / den if abs(den) > 1e-12 else float("nan")

    res["kl_recovered"] = rec(res["kl_zero"], res["kl_sae"], res["kl_clean"])
    if positions == "all":
        res["ce_recovered"] = rec(res["ce_zero"], res["ce_sae"], res["ce_clean"])
    else:
        res["ce_recovered"] = float("nan")
    res["n_prompts"] = n_rows
    res["n_tokens"] = n_tok
    return res
