"""The one KL divergence of the project: per-row ``KL(p || q)`` in nats from logits, numpy or torch.

``KL(p || q) = sum_v p_v (log p_v - log q_v)`` with ``p = softmax(p_logits)``, ``q = softmax(q_logits)``, over
the full vocabulary or over a set of allowed token ids with both distributions renormalised on that set
(docs/ALGORITHMS.md, section 7). Always computed in float64 whatever the input dtype. Terms with ``p_v = 0``
(a ``-inf`` logit, e.g. a masked id) contribute 0; a row where ``q_v = 0 < p_v`` has KL ``+inf``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mechdiff.errors import MechdiffError
from mechdiff.stats.checks import as_f64


def token_ids(allowed: Any, vocab: int | None = None) -> np.ndarray:
    """int64 token ids, in their order, from ids (numpy, a list or a torch tensor) or a boolean mask (its True
    positions; of shape (vocab,) when `vocab` is given)."""
    ids = np.asarray(allowed.detach().cpu().numpy() if hasattr(allowed, "detach") else allowed)
    if ids.dtype != bool:
        return ids.astype(np.int64).ravel()
    if vocab is not None and ids.shape != (vocab,):
        raise MechdiffError(f"allowed mask has shape {ids.shape}, expected ({vocab},)")
    return np.flatnonzero(ids)


def allowed_index(allowed: Any, vocab: int, *, keep_order: bool = False) -> np.ndarray | None:
    """Validated int64 token ids from ids or a boolean (vocab,) mask; None when they are the whole vocabulary,
    unless `keep_order` (ids aligned with another vocabulary's, where a permutation of every id is not a no-op)."""
    if allowed is None:
        return None
    ids = token_ids(allowed, vocab)
    if ids.size == 0:
        raise MechdiffError("allowed token ids are empty: the two tokenizers share no vocabulary")
    if ids.min() < 0 or ids.max() >= vocab:
        raise MechdiffError(f"allowed token ids out of range for a vocabulary of {vocab}: the tokenizer does not "
                            "match the model")
    if not keep_order and ids.size == vocab and np.array_equal(np.sort(ids), np.arange(vocab)):
        return None  # identical tokenizers: the restriction is a no-op and costs nothing
    return ids


def _is_torch(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _rows_np(x: Any, what: str) -> np.ndarray:
    a = as_f64(x, what)
    return a[None, :] if a.ndim == 1 else a


def _check(a: Any, what: str, isnan, isposinf) -> None:
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise MechdiffError(f"{what} must be (rows, vocab) logits, got shape {tuple(a.shape)}")
    top = a.max()  # one pass: a NaN anywhere makes the max NaN (numpy and torch both propagate it)
    if bool(isnan(top)) or bool(isposinf(top)):
        raise MechdiffError(f"{what} contains NaN or +inf: a model run in float16/bfloat16 can overflow (run it in "
                            "float32); logits read from an activation store mean a damaged store (delete it and "
                            "rerun its extract stage)")


def log_softmax(logits: Any) -> Any:
    """Row-wise log-softmax in float64 (numpy in -> numpy out, torch in -> torch out); -inf logits stay -inf."""
    return _log_softmax(logits, checked=False)


def _log_softmax(logits: Any, *, checked: bool) -> Any:
    """`log_softmax`; `checked`: the caller already rejected NaN / +inf (one pass over the logits, not two)."""
    if _is_torch(logits):
        t = logits.double()
        t = t[None, :] if t.dim() == 1 else t
        if not checked:
            _check(t, "logits", torch.isnan, torch.isposinf)
        if not bool(torch.isfinite(t.max(dim=-1).values).all()):
            raise MechdiffError("a logits row is entirely -inf: at least one token must be allowed")
        return torch.log_softmax(t, dim=-1)
    a = _rows_np(logits, "logits")
    if not checked:
        _check(a, "logits", np.isnan, np.isposinf)
    m = a.max(axis=1, keepdims=True)
    if not np.isfinite(m).all():
        raise MechdiffError("a logits row is entirely -inf: at least one token must be allowed")
    z = a - m
    with np.errstate(divide="ignore"):
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_divergence(p_logits: Any, q_logits: Any, allowed: Any = None) -> Any:
    """Per-row KL(p || q) in nats (float64) from logits; numpy in -> numpy (rows,), torch in -> torch (rows,).

    `allowed` (token ids, or a boolean vocabulary mask) restricts both distributions to those ids,
    renormalised there. Both inputs must be of one kind and shape (rows, vocab) or (vocab,).
    """
    if _is_torch(p_logits) != _is_torch(q_logits):
        raise MechdiffError("p_logits and q_logits must both be numpy arrays or both torch tensors")
    if _is_torch(p_logits):
        p, q = p_logits.double(), q_logits.to(device=p_logits.device, dtype=torch.float64)
        p, q = (p[None, :] if p.dim() == 1 else p), (q[None, :] if q.dim() == 1 else q)
    else:
        p, q = _rows_np(p_logits, "p_logits"), _rows_np(q_logits, "q_logits")
    if tuple(p.shape) != tuple(q.shape):
        raise MechdiffError(f"p and q logits must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    lib = torch if _is_torch(p) else np
    for x, what in ((p, "p_logits"), (q, "q_logits")):
        _check(x, what, lib.isnan, lib.isposinf)
    ids = allowed_index(allowed, int(p.shape[1]))
    if ids is not None and _is_torch(p):
        sel = torch.from_numpy(ids).to(p.device)
        p, q = p.index_select(1, sel), q.index_select(1, sel)
    elif ids is not None:
        p, q = p[:, ids], q[:, ids]
    lp, lq = _log_softmax(p, checked=True), _log_softmax(q, checked=True)
    if _is_torch(lp):
        pp = lp.exp()
        return torch.where(pp > 0, pp * (lp - lq), torch.zeros_like(pp)).sum(dim=-1)
    pp = np.exp(lp)
    with np.errstate(invalid="ignore"):
        return np.where(pp > 0.0, pp * (lp - lq), 0.0).sum(axis=1)


__all__ = ["allowed_index", "kl_divergence", "log_softmax", "token_ids"]
