"""Representation similarity (linear CKA with bootstrap CIs) and next-token KL divergence.

Definitions follow ALGORITHMS.md: linear CKA (Kornblith et al. 2019) is computed in its d x d form
``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` on column-centred data, never through N x N Gram
matrices, so it scales to many prompts. KL is ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the full
vocabulary, or over a set of allowed token ids with both distributions renormalised over that set.
Everything is computed in float64 whatever the input dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mechdiff.errors import MechdiffError
from mechdiff.stats.checks import as_f64, matrix


def _pair(X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
    x = matrix(X, "X", min_rows=2)
    y = matrix(Y, "Y", min_rows=2)
    if x.shape[0] != y.shape[0]:
        raise MechdiffError(f"X and Y must have the same rows (prompts): got {x.shape[0]} and {y.shape[0]}")
    return x, y


def _cka_centred(xc: np.ndarray, yc: np.ndarray) -> float:
    """CKA of already column-centred data (d x d form)."""
    num = float(np.sum((yc.T @ xc) ** 2))
    den = float(np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    if den <= 0.0 or not np.isfinite(den):
        return float("nan")
    return num / den


def linear_cka(X: Any, Y: Any) -> float:
    """Linear CKA between rows-aligned activations X (N, d1) and Y (N, d2); NaN if either side is constant."""
    x, y = _pair(X, Y)
    return _cka_centred(x - x.mean(axis=0), y - y.mean(axis=0))


def _percentile_ci(samples: np.ndarray, ci: float) -> tuple[float, float]:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return float("nan"), float("nan")
    q = 100.0 * (1.0 - ci) / 2.0
    return float(np.percentile(s, q)), float(np.percentile(s, 100.0 - q))


def _check_boot(n_boot: int, ci: float) -> None:
    if not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise MechdiffError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < float(ci) < 1.0:
        raise MechdiffError(f"ci must be in (0, 1), e.g. 0.95, got {ci!r}")


def cka_bootstrap(
    X: Any, Y: Any, *, n_boot: int = 200, seed: int = 0, ci: float = 0.95
) -> tuple[float, float, float]:
    """(CKA, lower, upper): linear CKA and a percentile bootstrap CI from resampling prompts (rows)."""
    _check_boot(n_boot, ci)
    x, y = _pair(X, Y)
    est = _cka_centred(x - x.mean(axis=0), y - y.mean(axis=0))
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    vals = np.empty(n_boot, dtype=np.float64)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)  # the replicates only set the CI: float32 is 2x faster
    for i in range(n_boot):
        idx = rng.integers(0, n, size=n)
        xb, yb = x32[idx], y32[idx]
        vals[i] = _cka_centred(xb - xb.mean(axis=0), yb - yb.mean(axis=0))
    lo, hi = _percentile_ci(vals, ci)
    return est, lo, hi


def _logits(x: Any, what: str) -> np.ndarray:
    a = as_f64(x, what)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise MechdiffError(f"{what} must be (rows, vocab) logits, got shape {a.shape}")
    if np.isnan(a).any() or np.isposinf(a).any():
        raise MechdiffError(f"{what} contains NaN or +inf: the model output overflowed (try float32)")
    return a


def log_softmax_np(logits: Any) -> np.ndarray:
    """Row-wise log-softmax in float64 (-inf logits, e.g. masked ids, get log-probability -inf)."""
    a = _logits(logits, "logits")
    m = a.max(axis=1, keepdims=True)
    if not np.isfinite(m).all():
        raise MechdiffError("a logits row is entirely -inf: at least one token must be allowed")
    z = a - m
    with np.errstate(divide="ignore"):
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _allowed_ids(allowed: Any, vocab: int) -> np.ndarray:
    ids = np.asarray(allowed)
    if ids.dtype == bool:
        if ids.shape != (vocab,):
            raise MechdiffError(f"allowed mask has shape {ids.shape}, expected ({vocab},)")
        ids = np.flatnonzero(ids)
    ids = ids.astype(np.int64).ravel()
    if ids.size == 0:
        raise MechdiffError("allowed token ids are empty: the two tokenizers share no vocabulary")
    if ids.min() < 0 or ids.max() >= vocab:
        raise MechdiffError(f"allowed token ids out of range for a vocabulary of {vocab}")
    return ids


def kl_divergence(p_logits: Any, q_logits: Any, allowed: np.ndarray | None = None) -> np.ndarray:
    """Per-row KL(p || q) in nats from logits (numpy or torch), over the full vocabulary or the allowed ids."""
    p = _logits(p_logits, "p_logits")
    q = _logits(q_logits, "q_logits")
    if p.shape != q.shape:
        raise MechdiffError(f"p and q logits must have the same shape, got {p.shape} and {q.shape}")
    if allowed is not None:
        ids = _allowed_ids(allowed, p.shape[1])
        p, q = p[:, ids], q[:, ids]
    lp, lq = log_softmax_np(p), log_softmax_np(q)
    pp = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(pp > 0.0, pp * (lp - lq), 0.0)
    return terms.sum(axis=1)


def bootstrap_mean_ci(
    x: Any, *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lower, upper): the mean of x and a percentile bootstrap CI of it."""
    _check_boot(n_boot, ci)
    a = as_f64(x, "x").ravel()
    if a.size == 0:
        raise MechdiffError("cannot bootstrap an empty sample: no prompts were evaluated")
    if not np.isfinite(a).all():
        raise MechdiffError("the sample contains NaN or inf: check the per-prompt values")
    rng = np.random.default_rng(seed)
    means = np.concatenate([
        a[rng.integers(0, a.size, size=(min(256, n_boot - s), a.size))].mean(axis=1)
        for s in range(0, n_boot, 256)
    ])
    lo, hi = _percentile_ci(means, ci)
    return float(a.mean()), lo, hi
