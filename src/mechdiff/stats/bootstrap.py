"""The one bootstrap of the project: percentile CIs from `scipy.stats.bootstrap`, seeded, over prompts (rows).

Every CI resamples prompts with replacement (``scipy.stats.bootstrap``, ``method='percentile'``, a seeded
``numpy.random.Generator``). Replicates whose statistic is not finite (e.g. a resample whose raw KL is 0)
are left out of the percentiles; when none is finite the CI is (NaN, NaN).

- `mean_ci`: the mean of one sample.
- `drop_pct_ci`: KL drop % ``100 (mean a - mean b) / mean a`` of paired samples (raw vs mapped KL per
  prompt), resampling prompts jointly. A mean raw KL within float noise of 0 (`noise_floor`) makes the drop
  undefined: NaN, written as null in JSON.
- `rows_ci`: any statistic of row-aligned matrices (e.g. linear CKA of (N, d) activations), resampling row
  indices jointly (scipy's documented trick for multivariate paired data).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import bootstrap as _scipy_bootstrap

from mechdiff.errors import MechdiffError
from mechdiff.stats.checks import as_f64

# Resamples per vectorised batch. 256 keeps memory at 256 x N per batch and, with the same seed, draws the
# same resamples as the project's earlier hand-written loops, so CIs are unchanged.
BATCH = 256
# KL values (nats) whose magnitude is below this are float noise: logits are float32 (eps 1.2e-7) and a
# per-prompt KL of two float32 softmaxes that agree to rounding is O(1e-7 x logit scale); a mean raw KL below
# this floor means the raw cross-patch did not change the output, so a relative drop is undefined.
KL_NOISE_FLOOR = 1e-6


def check_boot(n_boot: Any, ci: Any = 0.95) -> None:
    """Raise a one-line error unless n_boot is a positive integer and ci is in (0, 1)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise MechdiffError(f"n_boot must be a positive integer, got {n_boot!r}")
    if isinstance(ci, bool) or not 0.0 < float(ci) < 1.0:
        raise MechdiffError(f"ci must be in (0, 1), e.g. 0.95, got {ci!r}")


def _sample(x: Any, what: str) -> np.ndarray:
    a = as_f64(x, what).ravel()
    if a.size == 0:
        raise MechdiffError(f"cannot bootstrap an empty {what}: no prompts were evaluated")
    if not np.isfinite(a).all():
        raise MechdiffError(f"{what} contains NaN or inf: check the per-prompt values")
    return a


def _ci(data: tuple, stat: Callable, *, n_boot: int, seed: int, ci: float, paired: bool, batch: int
        ) -> tuple[float, float]:
    """Percentile CI of `stat` (vectorised along the last axis) under scipy's bootstrap; NaNs left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # degenerate resamples: handled below
        res = _scipy_bootstrap(data, stat, n_resamples=int(n_boot), batch=batch, vectorized=True, paired=paired,
                               axis=-1, confidence_level=float(ci), method="percentile",
                               rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.isfinite(lo) and np.isfinite(hi):
        return lo, hi
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64).ravel()
    dist = dist[np.isfinite(dist)]
    if dist.size == 0:
        return float("nan"), float("nan")
    q = 100.0 * (1.0 - float(ci)) / 2.0
    return float(np.percentile(dist, q)), float(np.percentile(dist, 100.0 - q))


def mean_ci(x: Any, *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper): the mean of a per-prompt sample and its percentile bootstrap CI."""
    check_boot(n_boot, ci)
    a = _sample(x, "sample")
    if a.size == 1:
        return float(a[0]), float(a[0]), float(a[0])
    lo, hi = _ci((a,), lambda s, axis=-1: s.mean(axis=axis), n_boot=n_boot, seed=seed, ci=ci, paired=False,
                 batch=BATCH)
    return float(a.mean()), lo, hi


def mean_diff_ci(a: Any, b: Any, *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
                 ) -> tuple[float, float, float]:
    """(mean b - mean a, lower, upper) for independent samples a and b, each resampled on its own."""
    check_boot(n_boot, ci)
    x, y = _sample(a, "first sample"), _sample(b, "second sample")
    if min(x.size, y.size) < 2:
        raise MechdiffError(f"a difference of independent means needs at least 2 values per sample, got {x.size} and {y.size}")
    lo, hi = _ci((x, y), lambda s, t, axis=-1: t.mean(axis=axis) - s.mean(axis=axis), n_boot=n_boot, seed=seed,
                 ci=ci, paired=False, batch=BATCH)
    return float(y.mean() - x.mean()), lo, hi


def drop_pct(raw: float, mapped: float, floor: float = KL_NOISE_FLOOR) -> float:
    """100 (raw - mapped) / raw, or NaN when |raw| <= floor (a drop relative to float noise is undefined)."""
    if not np.isfinite(raw) or abs(raw) <= floor:
        return float("nan")
    return 100.0 * (raw - mapped) / raw


def drop_pct_ci(raw: Any, mapped: Any, *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                floor: float = KL_NOISE_FLOOR) -> dict:
    """Paired KL drop %: {'drop_pct', 'ci_low', 'ci_high', 'kl_raw', 'kl_mapped'}; all three NaN below `floor`.

    The drop is 100 (mean raw - mean mapped) / mean raw over prompts; the CI resamples prompts jointly. A mean
    raw KL at or below `floor` nats (KL_NOISE_FLOOR) means the raw patch did not move the output: undefined.
    """
    check_boot(n_boot, ci)
    a, b = _sample(raw, "raw KL"), _sample(mapped, "mapped KL")
    if a.shape != b.shape:
        raise MechdiffError(f"raw and mapped KL must be paired per prompt, got {a.size} and {b.size} values")
    ma, mb = float(a.mean()), float(b.mean())
    out = {"drop_pct": drop_pct(ma, mb, floor), "ci_low": float("nan"), "ci_high": float("nan"), "kl_raw": ma,
           "kl_mapped": mb}
    if np.isnan(out["drop_pct"]):
        return out
    if a.size == 1:  # every resample is the one prompt
        out["ci_low"] = out["ci_high"] = out["drop_pct"]
        return out

    def stat(s: np.ndarray, t: np.ndarray, axis: int = -1) -> np.ndarray:
        ra, rb = s.mean(axis=axis), t.mean(axis=axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(np.abs(ra) > floor, 100.0 * (ra - rb) / ra, np.nan)

    out["ci_low"], out["ci_high"] = _ci((a, b), stat, n_boot=n_boot, seed=seed, ci=ci, paired=True, batch=BATCH)
    return out


def rows_ci(stat: Callable[[np.ndarray], Any], n_rows: int, *, n_boot: int = 200, seed: int = 0,
            ci: float = 0.95, vectorized: bool = False) -> tuple[float, float]:
    """(lower, upper): percentile CI of `stat(idx)` over resampled row indices idx (n_rows,) of aligned data.

    `stat` takes one int64 index vector and returns a float (e.g. CKA of X[idx], Y[idx]); each replicate is one
    call. One resample per scipy batch keeps the resample stream of the project's earlier per-replicate loop.
    With `vectorized`, `stat` takes a (B, n_rows) block of resamples and returns B values; resamples are then
    drawn `BATCH` at a time (the same draws as `mean_ci` makes).
    """
    check_boot(n_boot, ci)
    if n_rows < 2:
        raise MechdiffError(f"need at least 2 rows to bootstrap, got {n_rows}")
    if vectorized:
        def many(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            idx = np.asarray(idx)
            flat = np.asarray(stat(idx.reshape(-1, n_rows)), dtype=np.float64)
            return flat.reshape(idx.shape[:-1])

        return _ci((np.arange(n_rows),), many, n_boot=n_boot, seed=seed, ci=ci, paired=False, batch=BATCH)

    def vec(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.atleast_2d(idx)
        return np.array([stat(row) for row in idx], dtype=np.float64)

    return _ci((np.arange(n_rows),), vec, n_boot=n_boot, seed=seed, ci=ci, paired=False, batch=1)


__all__ = ["BATCH", "KL_NOISE_FLOOR", "check_boot", "drop_pct", "drop_pct_ci", "mean_ci", "mean_diff_ci", "rows_ci"]
