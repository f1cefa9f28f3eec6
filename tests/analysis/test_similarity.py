"""Linear CKA, KL and bootstrap CIs against direct formulas (numpy / scipy)."""

import numpy as np
import pytest
import torch
from scipy.special import rel_entr, softmax

from mechdiff.analysis.similarity import (
    bootstrap_mean_ci,
    cka_bootstrap,
    kl_divergence,
    linear_cka,
    log_softmax_np,
)
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


def test_kl_against_scipy_and_masking():
    rng = np.random.default_rng(3)
    p, q = rng.normal(size=(6, 30)) * 2, rng.normal(size=(6, 30)) * 2
    ref = rel_entr(softmax(p, axis=1), softmax(q, axis=1)).sum(axis=1)
    np.testing.assert_allclose(kl_divergence(p, q), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kl_divergence(torch.tensor(p), torch.tensor(q)), ref, rtol=1e-10)
    np.testing.assert_allclose(kl_divergence(p, p), 0.0, atol=1e-14)
    allowed = np.array([0, 3, 4, 10, 29])
    ref_m = rel_entr(softmax(p[:, allowed], axis=1), softmax(q[:, allowed], axis=1)).sum(axis=1)
    np.testing.assert_allclose(kl_divergence(p, q, allowed=allowed), ref_m, rtol=1e-10)
    mask = np.zeros(30, bool)
    mask[allowed] = True
    np.testing.assert_allclose(kl_divergence(p, q, allowed=mask), ref_m, rtol=1e-10)
    # -inf (masked) logits on p contribute zero mass
    p2 = p.copy()
    p2[:, 5] = -np.inf
    assert np.isfinite(kl_divergence(p2, q)).all()
    np.testing.assert_allclose(np.exp(log_softmax_np(p)).sum(axis=1), 1.0)


def test_kl_bad_input():
    with pytest.raises(MechdiffError):
        kl_divergence(np.array([[np.nan, 1.0]]), np.zeros((1, 2)))
    with pytest.raises(MechdiffError):
        kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(MechdiffError):
        kl_divergence(np.zeros((2, 3)), np.zeros((2, 3)), allowed=np.array([], dtype=int))


def test_bootstrap_mean_ci():
    rng = np.random.default_rng(4)
    x = rng.exponential(size=400)
    m, lo, hi = bootstrap_mean_ci(x, n_boot=500, seed=1)
    assert m == pytest.approx(x.mean())
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert lo < m < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)
    with pytest.raises(MechdiffError):
        bootstrap_mean_ci([])
