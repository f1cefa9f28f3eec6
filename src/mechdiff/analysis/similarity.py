"""Representation similarity (linear CKA with bootstrap CIs, per site) and next-token KL by dataset.

Linear CKA (Kornblith et al. 2019) is computed in its d x d form
``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` on column-centred data, never through N x N Gram
matrices, so it scales to many prompts; float64 whatever the input dtype. Its bootstrap replicates run in the
N x N Gram form when N is moderate (`GRAM_MAX_ROWS`): a resample is a vector of row counts w, and every
centred d x d product of the resample is a quadratic form in w of the Gram matrices, so all replicates of a
batch cost a few (N x N) @ (N x B) products instead of B recomputations of d x d products. KL is `mechdiff.stats.kl`
(``KL(p || q) = sum_v p_v (log p_v - log q_v)``), CIs are `mechdiff.stats.bootstrap`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site
from mechdiff.resume import UnitsFn, compute_all
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


# Above this many rows the Gram matrices (5 of N x N float64) would cost more memory than they save time.
GRAM_MAX_ROWS = 4096


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(n, B) float64 row counts of B resamples idx (B, n)."""
    B = idx.shape[0]
    flat = (idx + n * np.arange(B)[:, None]).ravel()
    return np.bincount(flat, minlength=n * B).reshape(B, n).T.astype(np.float64)


def cka_gram_replicates(xc: np.ndarray, yc: np.ndarray, dtype: str = "float64"
                        ) -> Callable[[np.ndarray], np.ndarray]:
    """A vectorised statistic idx (B, N) -> (B,) linear CKA of the resamples X[idx], Y[idx], via Gram matrices.

    With w the row counts of a resample (sum N), K = Xc Xc^T, L = Yc Yc^T (Xc, Yc centred on the full
    sample), the resample's own centring gives the exact identity
    ``||Xb^T Yb||_F^2 = w^T (K o L) w - (2/N) sum_i w_i (Kw)_i (Lw)_i + (w^T K w)(w^T L w) / N^2``
    (o the elementwise product), and likewise for the two norms in the denominator. `dtype` float32 runs the
    (N x N) @ (N x B) products in float32 (sums stay float64).
    """
    n = xc.shape[0]
    dt = np.dtype(dtype)
    K, L = xc @ xc.T, yc @ yc.T
    KL, KK, LL = (a.astype(dt, copy=False) for a in (K * L, K * K, L * L))
    K, L = K.astype(dt, copy=False), L.astype(dt, copy=False)

    def stat(idx: np.ndarray) -> np.ndarray:
        W = _counts(np.asarray(idx, dtype=np.int64), n)
        Wd = W.astype(dt, copy=False)

        def quad(A: np.ndarray) -> np.ndarray:  # w^T A w per column, products in dt, sums in float64
            return (W * (A @ Wd)).sum(0)

        Kw, Lw = (K @ Wd).astype(np.float64), (L @ Wd).astype(np.float64)
        kk, ll = (W * Kw).sum(0), (W * Lw).sum(0)
        num = quad(KL) - 2.0 / n * (W * Kw * Lw).sum(0) + kk * ll / n**2
        dx = quad(KK) - 2.0 / n * (W * Kw * Kw).sum(0) + kk**2 / n**2
        dy = quad(LL) - 2.0 / n * (W * Lw * Lw).sum(0) + ll**2 / n**2
        den = np.sqrt(np.clip(dx, 0.0, None) * np.clip(dy, 0.0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / den, np.nan)

    return stat


def cka_bootstrap(
    X: Any, Y: Any, *, n_boot: int = 200, seed: int = 0, ci: float = 0.95, gram: bool | None = None,
) -> tuple[float, float, float]:
    """(CKA, lower, upper): linear CKA and a percentile bootstrap CI from resampling prompts (rows).

    `gram` (default: N <= GRAM_MAX_ROWS) computes the replicates in the Gram form (`cka_gram_replicates`,
    float64, batched); otherwise each replicate recomputes the d x d products in float32.
    """
    x, y = _pair(X, Y)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    est = _cka_centred(xc, yc)
    if gram if gram is not None else x.shape[0] <= GRAM_MAX_ROWS:
        lo, hi = rows_ci(cka_gram_replicates(xc, yc), x.shape[0], n_boot=n_boot, seed=seed, ci=ci, vectorized=True)
        return est, lo, hi
    x32, y32 = x.astype(np.float32), y.astype(np.float32)  # the replicates only set the CI: float32 is 2x faster

    def stat(idx: np.ndarray) -> float:
        xb, yb = x32[idx], y32[idx]
        return _cka_centred(xb - xb.mean(axis=0), yb - yb.mean(axis=0))

    lo, hi = rows_ci(stat, x.shape[0], n_boot=n_boot, seed=seed, ci=ci)
    return est, lo, hi


def cka_by_site(base: Any, tuned: Any, *, views: Sequence[str] = ("last", "mean"), n_boot: int = 200,
                seed: int = 0, units: UnitsFn = compute_all) -> list[dict]:
    """One record per site of two stores: {'layer', 'site', 'cka_<view>', 'cka_<view>_lo', 'cka_<view>_hi'}.

    `base` and `tuned` are activation stores (anything with `.sites` and `.read(site, view)`); sites are those
    of `base`, in its order; each CKA has a percentile bootstrap CI over prompts (`cka_bootstrap`). `units`
    (`resume.Units`) keeps each site's record as it finishes, so an interrupted run resumes.
    """
    def record(name: str) -> dict[str, Any]:
        rec: dict[str, Any] = {"layer": Site.parse(name).layer, "site": name}
        for view in views:
            try:
                c, lo, hi = cka_bootstrap(base.read(name, view), tuned.read(name, view), n_boot=n_boot, seed=seed)
            except MechdiffError as e:  # say which site and stores: the message alone names only X / Y
                where = " / ".join(str(getattr(st, "path", "")) for st in (base, tuned) if getattr(st, "path", ""))
                raise MechdiffError(f"CKA at {name}/{view}{f' ({where})' if where else ''}: {e}") from e
            rec.update({f"cka_{view}": c, f"cka_{view}_lo": lo, f"cka_{view}_hi": hi})
        return rec

    return [units(f"cka/{name}", lambda name=name: record(name)) for name in base.sites]


def next_token_kl(p_logits: Any, q_logits: Any, allowed_p: Any = None, allowed_q: Any = None) -> np.ndarray:
    """Per-prompt KL(p || q) of stored decision-token logits, each side restricted to its aligned shared ids.

    `allowed_p[i]` and `allowed_q[i]` name the same token string on the two sides (mechdiff.data.fairness);
    both None when the tokenizers are identical.
    """
    if (allowed_p is None) != (allowed_q is None):
        raise MechdiffError("give the shared token ids of both sides, or of neither (identical tokenizers)")
    p, q = as_f64(p_logits, "p_logits"), as_f64(q_logits, "q_logits")
    if p.ndim != 2 or q.ndim != 2 or p.shape[0] != q.shape[0]:
        raise MechdiffError(f"p and q logits must both be (prompts, vocab) with the same prompts, got {p.shape} and "
                            f"{q.shape}")
    if allowed_p is not None:
        ip, iq = np.asarray(allowed_p, dtype=np.int64), np.asarray(allowed_q, dtype=np.int64)
        if ip.shape != iq.shape:
            raise MechdiffError(f"shared token ids differ in length between the sides: {ip.size} vs {iq.size}")
        allowed_index(ip, p.shape[-1])  # validates: non-empty, in range
        allowed_index(iq, q.shape[-1])
        p, q = p[:, ip], q[:, iq]
    if p.shape != q.shape:
        raise MechdiffError(f"p and q logits differ in vocabulary ({p.shape[1]} vs {q.shape[1]}): give the shared "
                            "token ids of both sides")
    # torch kernels over row blocks: the same float64 arithmetic, several times faster than numpy on a wide vocabulary
    out = np.empty(p.shape[0], dtype=np.float64)
    for a in range(0, p.shape[0], 256):
        out[a : a + 256] = kl_divergence(torch.from_numpy(p[a : a + 256]), torch.from_numpy(q[a : a + 256])).numpy()
    return out


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


