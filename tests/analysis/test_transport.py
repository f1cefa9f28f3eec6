"""Transport maps against scipy / sklearn references and planted ground truth."""

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes, subspace_angles
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score as sk_r2

from mechdiff.analysis.transport import (
    auto_alpha,
    diagnostics,
    fit_map,
    load_map,
    principal_cosines,
    r2_score,
    rank_value,
    recolour,
    save_map,
)
from mechdiff.errors import MechdiffError


def _data(n=300, d=12, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) @ np.diag(np.exp(rng.normal(size=d) * 0.4)) + rng.normal(size=d)
    return rng, X


def test_procrustes_matches_scipy():
    rng, X = _data()
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    Y = X @ Q + 0.1 * rng.normal(size=X.shape) + 2.0
    m = fit_map(X, Y, solver="procrustes", rank_mode="subspace")
    R, _ = orthogonal_procrustes(X - X.mean(0), Y - Y.mean(0))
    np.testing.assert_allclose(m.W, R, atol=1e-10)
    np.testing.assert_allclose(m.apply(X[:5]), (X[:5] - X.mean(0)) @ R + Y.mean(0), atol=1e-10)


def test_ridge_matches_sklearn_and_picks_best_lambda():
    rng, X = _data(n=120, d=20)
    Y = X @ rng.normal(size=(20, 8)) + 3.0 * rng.normal(size=(120, 8))
    Xtr, Ytr, Xv, Yv = X[:80], Y[:80], X[80:], Y[80:]
    grid = (1e-2, 1.0, 30.0, 300.0, 3000.0)
    m = fit_map(Xtr, Ytr, solver="ridge", lambdas=grid, X_val=Xv, Y_val=Yv, rank_mode="subspace")
    mx, sx, my, sy = Xtr.mean(0), Xtr.std(0), Ytr.mean(0), Ytr.std(0)
    scores = {}
    for lam in grid:
        sk = Ridge(alpha=lam, fit_intercept=False).fit((Xtr - mx) / sx, (Ytr - my) / sy)
        pred = sk.predict((Xv - mx) / sx)
        scores[lam] = sk_r2((Yv - my) / sy, pred, multioutput="variance_weighted")
    best = max(scores, key=scores.get)
    assert m.meta["lambda"] == best
    assert best not in (grid[0], grid[-1])  # the grid brackets the optimum in this setting
    sk = Ridge(alpha=best, fit_intercept=False).fit((Xtr - mx) / sx, (Ytr - my) / sy)
    np.testing.assert_allclose(m.apply(Xv), sk.predict((Xv - mx) / sx) * sy + my, atol=1e-8)


def test_subspace_rank_k_has_rank_k():
    rng, X = _data()
    Y = X @ rng.normal(size=(12, 12)) + rng.normal(size=X.shape)
    for solver in ("procrustes_scaled", "procrustes", "ridge"):
        m = fit_map(X, Y, solver=solver, rank_mode="subspace")
        for k in (1, 3, 7):
            assert np.linalg.matrix_rank(m.at_rank(k).W, tol=1e-8) == k
        np.testing.assert_allclose(m.at_rank(0).W, m.W)  # subspace: k = 0 means full rank
        assert rank_value("full") is None and rank_value(8) == 8 and rank_value(0) == 0
        np.testing.assert_allclose(m.at_rank(rank_value("full")).W, m.W)
        r2 = [r2_score(Y, m.at_rank(k).apply(X)) for k in (1, 4, 12)]
        assert r2[0] < r2[1] < r2[2] + 1e-9


def test_procrustes_scaled_recovers_scaled_rotation():
    rng, X = _data(n=400)
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    Y = 2.5 * X @ Q + 3.0
    m = fit_map(X[:300], Y[:300], solver="procrustes_scaled")
    d = diagnostics(m, X[:300], Y[:300], X[300:], Y[300:])
    assert d["r2_val"] > 0.99 and d["r2_val_whitened"] > 0.99 and d["cka_val"] > 0.99
    assert d["r2_val_shuffled"] < 0.1 and d["cos_p10"] > 0.99
    assert auto_alpha(m, X[300:], Y[300:]) == pytest.approx(1.0, abs=0.01)


def test_subspace_procrustes_scaled_rank_k_scale_is_least_squares():
    """Subspace rank k: the scale is the least-squares one of the rank-k rotation in whitened space (numpy
    reference), so a planted rank-r map is recovered at k = r (an ||Xw||^2 denominator shrank it by ~k/d)."""
    rng = np.random.default_rng(5)
    n, d, r = 800, 24, 4
    X = rng.normal(size=(n, d)) @ np.diag(np.exp(rng.normal(size=d) * 0.3)) + 1.0
    U, _ = np.linalg.qr(rng.normal(size=(d, r)))
    V, _ = np.linalg.qr(rng.normal(size=(d, r)))
    Y = X @ U @ np.diag(rng.uniform(1, 3, r)) @ V.T + 0.05 * rng.normal(size=(n, d)) + 2.0
    m = fit_map(X[:600], Y[:600], solver="procrustes_scaled", shrink=0.0, rank_mode="subspace")
    # whitened coordinates from numpy's eigh, the rank-k rotation from numpy's SVD
    xc, yc = X[:600] - X[:600].mean(0), Y[:600] - Y[:600].mean(0)

    def inv_sqrt(C):
        e, E = np.linalg.eigh(C)
        return E @ np.diag(np.maximum(e, e.max() * 1e-6) ** -0.5) @ E.T

    Xw, Yw = xc @ inv_sqrt(xc.T @ xc / 599), yc @ inv_sqrt(yc.T @ yc / 599)
    Us, _, Vts = np.linalg.svd(Xw.T @ Yw)
    for k in (1, r, 12):
        P = Xw @ Us[:, :k] @ Vts[:k]
        s_ref = np.linalg.lstsq(P.reshape(-1, 1), Yw.reshape(-1), rcond=None)[0][0]
        assert m.factors["scales"][k - 1] == pytest.approx(s_ref, rel=1e-6)
    s_full = np.linalg.svd(Xw.T @ Yw, compute_uv=False).sum() / np.sum(Xw**2)
    assert m.factors["scales"][-1] == pytest.approx(s_full, rel=1e-6)  # full rank: the documented s
    # the planted map has rank r: the rank-r map predicts held-out rows, the full rotation also maps noise
    r2 = {k: r2_score(Y[600:], m.at_rank(k).apply(X[600:])) for k in (1, r, None)}
    assert r2[r] > 0.95 and r2[r] > r2[None] and r2[1] < 0.8


@pytest.mark.parametrize("r", [1, 4])
def test_delta_mode_recovers_planted_change(r):
    rng = np.random.default_rng(10 + r)
    n, d = 600, 48
    X = rng.normal(size=(n, d)) @ np.diag(np.exp(rng.normal(size=d) * 0.3)) + 1.0
    U, _ = np.linalg.qr(rng.normal(size=(d, r)))
    Y = X @ (np.eye(d) + 1.5 * U @ U.T) + 0.01 * rng.normal(size=(n, d))
    m = fit_map(X[:400], Y[:400])
    np.testing.assert_allclose(m.at_rank(0).apply(X), recolour(X, m.stats), atol=1e-12)
    cos = principal_cosines(m.basis[:, :r], U)
    assert cos.min() >= 0.9
    r2 = {k: r2_score(Y[400:], m.at_rank(k).apply(X[400:])) for k in (0, r - 1, r, None)}
    gain = (r2[r] - r2[0]) / (r2[None] - r2[0])
    assert gain > 0.95
    if r > 1:
        assert (r2[r - 1] - r2[0]) / (r2[None] - r2[0]) < 0.9
    np.testing.assert_allclose(m.at_rank(d).W, m.W)
    np.testing.assert_allclose(m.at_rank("full").apply(X[:3]), m.apply(X[:3]))


def test_recolour_formula_and_constant_dims():
    rng, X = _data(n=50, d=4)
    X[:, 2] = 7.0
    Y = rng.normal(size=(50, 4)) * 3 + 1
    m = fit_map(X, Y)
    H = rng.normal(size=(5, 4))
    want = (H - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1) * Y.std(0) + Y.mean(0)
    want[:, 2] = Y.mean(0)[2]
    np.testing.assert_allclose(recolour(H, m.stats), want, atol=1e-12)


def test_principal_cosines_vs_scipy():
    rng = np.random.default_rng(5)
    A, B = rng.normal(size=(10, 3)), rng.normal(size=(10, 4))
    ref = np.sort(np.cos(subspace_angles(A, B)))[::-1]
    np.testing.assert_allclose(principal_cosines(A, B), ref, atol=1e-10)
    np.testing.assert_allclose(principal_cosines(A, A @ rng.normal(size=(3, 3))), 1.0, atol=1e-10)


def test_save_load_roundtrip(tmp_path):
    rng, X = _data()
    Y = X @ rng.normal(size=(12, 12)) + 1.0
    for mode in ("delta", "subspace"):
        m = fit_map(X, Y, solver="procrustes_scaled", rank_mode=mode, site="L2.attn_out").at_rank(3)
        m = m.with_alpha(1.3)
        save_map(m, tmp_path / mode)
        m2 = load_map(tmp_path / mode)
        assert (m2.rank, m2.rank_mode, m2.alpha, m2.site) == (3, mode, 1.3, "L2.attn_out")
        np.testing.assert_array_equal(m2.apply(X), m.apply(X))
        np.testing.assert_array_equal(m2.at_rank(5).apply(X), m.at_rank(5).apply(X))
        # applicable without this project: safetensors + the formula in the JSON
        from safetensors.numpy import load_file

        t = load_file(str(tmp_path / mode / "map.safetensors"))
        np.testing.assert_allclose(1.3 * (X @ t["W"] + t["b"]), m.apply(X), atol=1e-12)
    ht = torch.tensor(X[:4], dtype=torch.float32)
    out = m.apply(ht)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), m.apply(X[:4]), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    rng, X = _data(n=20, d=4)
    Y = X.copy()
    bad = X.copy()
    bad[0, 0] = np.nan
    for args, kw in [
        ((bad, Y), {}), ((X, Y[:10]), {}), ((X[:0], Y[:0]), {}), ((X, Y), {"solver": "nope"}),
        ((X, Y), {"rank_mode": "nope"}), ((X, Y), {"shrink": 2.0}), ((X, Y), {"X_val": X}),
        ((X, Y[:, :3]), {}),  # delta mode needs equal widths
        ((X, Y), {"solver": "ridge", "lambdas": (-1.0,)}),
    ]:
        with pytest.raises(MechdiffError):
            fit_map(*args, **kw)
    m = fit_map(X, Y)
    with pytest.raises(MechdiffError):
        m.apply(np.ones((2, 5)))
    with pytest.raises(MechdiffError):
        m.at_rank(-1)
    with pytest.raises(MechdiffError):
        load_map("/nonexistent/map/dir")


def test_zero_variance_dimensions_behave_as_documented():
    """A base dim and a tuned dim that are constant on the train rows: what each solver does (docs/FORMATS.md)."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(80, 6))
    X[:, 2] = 7.0
    Y = X @ rng.normal(size=(6, 6)) + rng.normal(size=(80, 6))
    Y[:, 4] = -1.0
    H = X[:5].copy()
    H_off = H.copy()
    H_off[:, 2] += 1.0  # departs from the train mean in the constant base dim
    ridge = fit_map(X, Y, solver="ridge", rank_mode="subspace")
    np.testing.assert_array_equal(ridge.W[2], 0.0)  # constant base dim: input ignored
    np.testing.assert_array_equal(ridge.W[:, 4], 0.0)  # constant tuned dim: output is mu_t
    np.testing.assert_allclose(ridge.apply(H_off)[:, 4], -1.0, atol=1e-12)
    np.testing.assert_allclose(ridge.apply(H_off), ridge.apply(H), atol=1e-12)
    for solver in ("procrustes", "procrustes_scaled"):
        m = fit_map(X, Y, solver=solver, rank_mode="delta")
        assert np.isfinite(m.W).all()
        assert np.linalg.norm(m.W[2]) > 0.1  # not dropped: the unconstrained direction goes somewhere
        np.testing.assert_allclose(m.apply(H)[:, 4], -1.0, atol=1e-9)  # train rows sit at the constant's mean
        np.testing.assert_allclose(m.at_rank(0).apply(H_off), recolour(H_off, m.stats), atol=1e-12)
        np.testing.assert_allclose(m.at_rank(0).apply(H_off)[:, 2], Y[:, 2].mean(), atol=1e-12)
        sub = fit_map(X, Y, solver=solver, rank_mode="subspace")
        np.testing.assert_allclose(sub.at_rank(2).apply(H_off), sub.at_rank(2).apply(H), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(fit_map(X, Y, solver="procrustes").W[2]), 1.0, atol=1e-12)


def test_r2_is_sklearn_variance_weighted_and_shrinkage_is_sklearn():
    from sklearn.covariance import shrunk_covariance

    from mechdiff.analysis.transport import zca_factors

    rng = np.random.default_rng(12)
    Y = rng.normal(size=(40, 5)) * np.arange(1, 6)
    P = Y + rng.normal(size=Y.shape)
    pooled = 1 - np.sum((Y - P) ** 2) / np.sum((Y - Y.mean(0)) ** 2)
    assert r2_score(Y, P) == pytest.approx(pooled, abs=1e-12)
    assert r2_score(Y, P) == pytest.approx(sk_r2(Y, P, multioutput="variance_weighted"), abs=1e-12)
    assert np.isnan(r2_score(np.ones((4, 2)), np.zeros((4, 2))))
    C = np.cov(Y.T)
    inv_half, half = zca_factors(C, 0.1)
    S = shrunk_covariance(C, shrinkage=0.1)
    np.testing.assert_allclose(half @ half, S, atol=1e-10)
    np.testing.assert_allclose(inv_half @ S @ inv_half, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(S, 0.9 * C + 0.1 * np.trace(C) / 5 * np.eye(5), atol=1e-12)


def test_fit_site_is_fit_on_train_alpha_and_scores_on_val():
    from mechdiff.analysis.transport import fit_site

    rng, X = _data(n=90, d=6)
    Y = X @ rng.normal(size=(6, 6)) + rng.normal(size=(90, 6))
    tr, va = np.arange(60), np.arange(60, 90)
    m, metrics = fit_site(X, Y, tr, va, solver="procrustes_scaled", site="L1.attn_out", seed=3)
    ref = fit_map(X[tr], Y[tr], X_val=X[va], Y_val=Y[va], site="L1.attn_out")
    alpha = auto_alpha(ref, X[va], Y[va])
    np.testing.assert_allclose(m.W, ref.W)
    assert m.alpha == pytest.approx(alpha) and metrics["alpha_auto"] == pytest.approx(alpha)
    want = diagnostics(ref.with_alpha(alpha), X[tr], Y[tr], X[va], Y[va], seed=3)
    assert {k: metrics[k] for k in want} == pytest.approx(want)
    np.testing.assert_allclose(m.stats["mu_b"], X[tr].mean(0))  # recolour stats from train rows only
    with pytest.raises(MechdiffError, match="val"):
        fit_site(X, Y, tr, va[:1])
    Yn = Y.copy()
    Yn[3, 2] = np.inf
    with pytest.raises(MechdiffError, match="site L1.attn_out tuned activations contains NaN or inf"):
        fit_site(X, Yn, tr, va, site="L1.attn_out")
