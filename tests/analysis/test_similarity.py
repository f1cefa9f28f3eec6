"""Linear CKA, KL and bootstrap CIs against direct formulas (numpy / scipy)."""

import numpy as np
import pytest
import torch
from scipy.special import rel_entr, softmax

from mechdiff.analysis.similarity import cka_bootstrap, linear_cka
from mechdiff.errors import MechdiffError


def _cka_gram(X, Y):
    """CKA via N x N Gram matrices and centred HSIC (the textbook form)."""
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L))


def test_cka_matches_gram_formula():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 7))
    Y = X @ rng.normal(size=(7, 5)) + rng.normal(size=(80, 5))
    assert linear_cka(X, Y) == pytest.approx(_cka_gram(X, Y), abs=1e-12)
    assert linear_cka(X, Y) < 1.0


def test_cka_invariances_and_noise():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(X, 3.7 * X @ Q + 5.0) == pytest.approx(1.0, abs=1e-10)
    A, B = rng.normal(size=(3000, 4)), rng.normal(size=(3000, 4))
    assert linear_cka(A, B) < 0.02
    assert linear_cka(torch.tensor(X, dtype=torch.float32), X) == pytest.approx(1.0, abs=1e-6)


def test_cka_bootstrap_ci_contains_estimate():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(100, 6))
    Y = X + rng.normal(size=(100, 6))
    est, lo, hi = cka_bootstrap(X, Y, n_boot=100, seed=0)
    assert est == pytest.approx(linear_cka(X, Y))
    assert lo < est < hi and hi - lo > 0.01


def test_cka_bad_input():
    X = np.ones((10, 3))
    with pytest.raises(MechdiffError):
        linear_cka(np.full((5, 2), np.nan), np.ones((5, 2)))
    with pytest.raises(MechdiffError):
        linear_cka(X, np.ones((9, 3)))
    assert np.isnan(linear_cka(X, np.random.default_rng(0).normal(size=(10, 3))))


class _Stores:
    """Two in-memory stand-ins for activation stores: .sites and .read(site, view)."""

    def __init__(self, acts):
        self.acts = acts
        self.sites = list(acts)

    def read(self, site, view="last", rows=None):
        return self.acts[site][view]


def test_cka_by_site_matches_linear_cka_per_site_and_view():
    from mechdiff.analysis.similarity import cka_by_site

    rng = np.random.default_rng(7)
    names = ["L0.resid_post", "L1.attn_out"]
    base = {n: {v: rng.normal(size=(40, 5)) for v in ("last", "mean")} for n in names}
    tuned = {n: {v: base[n][v] + rng.normal(size=(40, 5)) * (i + 1) for v in ("last", "mean")}
             for i, n in enumerate(names)}
    recs = cka_by_site(_Stores(base), _Stores(tuned), n_boot=30, seed=0)
    assert [(r["layer"], r["site"]) for r in recs] == [(0, "L0.resid_post"), (1, "L1.attn_out")]
    for r in recs:
        for v in ("last", "mean"):
            want = _cka_gram(base[r["site"]][v], tuned[r["site"]][v])
            assert r[f"cka_{v}"] == pytest.approx(want, abs=1e-12)
            assert r[f"cka_{v}_lo"] <= r[f"cka_{v}"] + 0.05 and r[f"cka_{v}_hi"] >= r[f"cka_{v}"] - 0.05


def test_cka_by_site_names_the_site_and_stores_of_nan_activations():
    from mechdiff.analysis.similarity import cka_by_site

    rng = np.random.default_rng(7)
    base = {"L0.resid_post": {v: rng.normal(size=(10, 3)) for v in ("last", "mean")}}
    tuned = {"L0.resid_post": {v: a.copy() for v, a in base["L0.resid_post"].items()}}
    tuned["L0.resid_post"]["mean"][4, 1] = np.nan
    b, t = _Stores(base), _Stores(tuned)
    b.path, t.path = "acts/base.zarr", "acts/tuned.zarr"
    with pytest.raises(MechdiffError, match=r"L0.resid_post/mean \(acts/base.zarr / acts/tuned.zarr\).*NaN"):
        cka_by_site(b, t, n_boot=5, seed=0)


def test_next_token_kl_and_kl_by_dataset():
    from mechdiff.analysis.similarity import kl_by_dataset, next_token_kl

    rng = np.random.default_rng(8)
    lt, lb = rng.normal(size=(12, 9)), rng.normal(size=(12, 7))
    it, ib = np.array([0, 2, 5, 8]), np.array([6, 1, 3, 0])  # aligned pairs: same strings on both sides
    kl = next_token_kl(lt, lb, it, ib)
    want = rel_entr(softmax(lt[:, it], axis=1), softmax(lb[:, ib], axis=1)).sum(axis=1)
    np.testing.assert_allclose(kl, want, rtol=1e-10)
    same = rng.normal(size=(12, 9))
    np.testing.assert_allclose(next_token_kl(lt, same), rel_entr(softmax(lt, 1), softmax(same, 1)).sum(1),
                               rtol=1e-10)
    with pytest.raises(MechdiffError):
        next_token_kl(lt, lb, it, None)
    ds = ["cultural"] * 5 + ["control"] * 4 + ["other"] * 3
    rows, means = kl_by_dataset(kl, ds, n_boot=50, seed=0)
    assert [r["dataset"] for r in rows] == ["all", "control", "cultural", "other"]
    assert [r["n"] for r in rows] == [12, 4, 5, 3]
    assert means["all"] == pytest.approx(kl.mean())
    assert means["cultural"] == pytest.approx(kl[:5].mean()) and means["control"] == pytest.approx(kl[5:9].mean())
    assert means["cultural_over_control"] == pytest.approx(kl[:5].mean() / kl[5:9].mean())
    assert "cultural_over_control" not in kl_by_dataset(kl[:5], ds[:5], n_boot=20)[1]


def test_cka_gram_replicates_equal_direct_resamples_and_scipy_ci():
    """The Gram-form replicates are the d x d CKA of each resample; the CI is scipy's percentile bootstrap."""
    from scipy.stats import bootstrap

    from mechdiff.analysis.similarity import cka_gram_replicates

    rng = np.random.default_rng(3)
    N, d = 90, 12
    X = rng.normal(size=(N, d)) @ rng.normal(size=(d, d)) + 7.0  # a large mean: the identity must centre per resample
    Y = np.tanh(X[:, :9]) + 0.5 * rng.normal(size=(N, 9))
    idx = rng.integers(0, N, size=(6, N))
    got = cka_gram_replicates(X - X.mean(0), Y - Y.mean(0))(idx)
    np.testing.assert_allclose(got, [linear_cka(X[i], Y[i]) for i in idx], rtol=1e-10)
    est, lo, hi = cka_bootstrap(X, Y, n_boot=300, seed=4)
    ref = bootstrap((np.arange(N),), lambda i, axis=-1: np.apply_along_axis(lambda r: linear_cka(X[r], Y[r]), axis, i),
                    n_resamples=300, batch=256, vectorized=True, method="percentile",
                    rng=np.random.default_rng(4)).confidence_interval
    assert est == linear_cka(X, Y)
    np.testing.assert_allclose([lo, hi], [ref.low, ref.high], rtol=1e-9)
    _, lo2, hi2 = cka_bootstrap(X, Y, n_boot=300, seed=4, gram=False)  # the d x d loop: same CI up to resamples
    assert abs(lo2 - lo) < 0.05 and abs(hi2 - hi) < 0.05
