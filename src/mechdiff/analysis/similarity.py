"""Representation similarity (linear CKA with bootstrap CIs, per site) and next-token KL by dataset.

Linear CKA (Kornblith et al. 2019) is computed in its d x d form
``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` on column-centred data, never through N x N Gram
matrices, so it scales to many prompts; float64 whatever the input dtype. KL is `mechdiff.stats.kl`
(``KL(p || q) = sum_v p_v (log p_v - log q_v)``), CIs are `mechdiff.stats.bootstrap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site
from mechdiff.stats.bootstrap import mean_ci, rows_ci
from mechdiff.stats.checks import as_f64, matrix
from mechdiff.stats.kl import allowed_index, kl_divergence


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


def cka_bootstrap(
    X: Any, Y: Any, *, n_boot: int = 200, seed: int = 0, ci: float = 0.95
) -> tuple[float, float, float]:
    """(CKA, lower, upper): linear CKA and a percentile bootstrap CI from resampling prompts (rows)."""
    x, y = _pair(X, Y)
    est = _cka_centred(x - x.mean(axis=0), y - y.mean(axis=0))
    x32, y32 = x.astype(np.float32), y.astype(np.float32)  # the replicates only set the CI: float32 is 2x faster

    def stat(idx: np.ndarray) -> float:
        xb, yb = x32[idx], y32[idx]
        return _cka_centred(xb - xb.mean(axis=0), yb - yb.mean(axis=0))

    lo, hi = rows_ci(stat, x.shape[0], n_boot=n_boot, seed=seed, ci=ci)
    return est, lo, hi


def cka_by_site(base: Any, tuned: Any, *, views: Sequence[str] = ("last", "mean"), n_boot: int = 200,
                seed: int = 0) -> list[dict]:
    """One record per site of two stores: {'layer', 'site', 'cka_<view>', 'cka_<view>_lo', 'cka_<view>_hi'}.

    `base` and `tuned` are activation stores (anything with `.sites` and `.read(site, view)`); sites are those
    of `base`, in its order; each CKA has a percentile bootstrap CI over prompts (`cka_bootstrap`).
    """
    out = []
    for name in base.sites:
        site = Site.parse(name)
        rec: dict[str, Any] = {"layer": site.layer, "site": name}
        for view in views:
            c, lo, hi = cka_bootstrap(base.read(name, view), tuned.read(name, view), n_boot=n_boot, seed=seed)
            rec.update({f"cka_{view}": c, f"cka_{view}_lo": lo, f"cka_{view}_hi": hi})
        out.append(rec)
    return out


def next_token_kl(p_logits: Any, q_logits: Any, allowed_p: Any = None, allowed_q: Any = None) -> np.ndarray:
    """Per-prompt KL(p || q) of stored decision-token logits, each side restricted to its aligned shared ids.

    `allowed_p[i]` and `allowed_q[i]` name the same token string on the two sides (mechdiff.data.fairness);
    both None when the tokenizers are identical.
    """
    if (allowed_p is None) != (allowed_q is None):
        raise MechdiffError("give the shared token ids of both sides, or of neither (identical tokenizers)")
    p, q = as_f64(p_logits, "p_logits"), as_f64(q_logits, "q_logits")
    if allowed_p is not None:
        ip, iq = np.asarray(allowed_p, dtype=np.int64), np.asarray(allowed_q, dtype=np.int64)
        if ip.shape != iq.shape:
            raise MechdiffError(f"shared token ids differ in length between the sides: {ip.size} vs {iq.size}")
        allowed_index(ip, p.shape[-1])  # validates: non-empty, in range
        allowed_index(iq, q.shape[-1])
        p, q = p[:, ip], q[:, iq]
    return kl_divergence(p, q)


def kl_by_dataset(kl: Any, datasets: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
                  ratio: tuple[str, str] | None = ("cultural", "control")) -> tuple[list[dict], dict]:
    """Mean per-prompt KL with a bootstrap CI for all prompts and per dataset: (records, {dataset: mean}).

    Records are {'dataset', 'kl_mean', 'kl_lo', 'kl_hi', 'n'} for 'all' then each dataset (sorted). With
    `ratio` = (a, b) and both datasets present, the means also hold '<a>_over_<b>' = mean_a / max(mean_b, 1e-12).
    """
    k = as_f64(kl, "kl").ravel()
    ds = np.asarray([str(x) for x in datasets])
    if ds.shape != k.shape:
        raise MechdiffError(f"one dataset label per prompt is needed: {ds.size} labels for {k.size} KL values")
    rows, means = [], {}
    for name in ["all", *sorted(set(ds.tolist()))]:
        x = k if name == "all" else k[ds == name]
        m, lo, hi = mean_ci(x, n_boot=n_boot, seed=seed)
        rows.append({"dataset": name, "kl_mean": m, "kl_lo": lo, "kl_hi": hi, "n": int(x.size)})
        means[name] = m
    if ratio is not None and ratio[0] in means and ratio[1] in means:
        means[f"{ratio[0]}_over_{ratio[1]}"] = means[ratio[0]] / max(means[ratio[1]], 1e-12)
    return rows, means


