"""Transport maps base -> tuned at one site: ridge, procrustes, procrustes_scaled; rank k; alpha; save/load.

Every map is affine, ``map(h) = alpha * (h @ W + b)`` with ``W`` (d_base, d_tuned) and ``b`` (d_tuned,), so a
saved map can be applied without this project: ``map.safetensors`` holds ``W``, ``b``, the per-dimension
recolour statistics ``mu_b, sd_b, mu_t, sd_t`` and the factors that give every other rank, ``map.json`` the
config (solver, site, rank, alpha, shrink, lambda, widths and the formula).

Solvers (docs/ALGORITHMS.md, section 10), fitted on train rows:

- ``ridge``: z-score both sides with train statistics (dims with sd <= 1e-6 are dropped: they predict / read
  nothing; see "Zero-variance dimensions"), ``W = V diag(S / (S^2 + lambda)) U^T Y`` from ``svd(X)``; lambda is the grid value with the best
  validation R^2 (an internal seeded 80/20 split of the train rows when no validation set is given).
- ``procrustes``: ``U S V^T = svd(Xc^T Yc)`` on centred data, ``W = U V^T``.
- ``procrustes_scaled``: shrunk covariances ``C_sh = (1-g) C + g tr(C)/d I``, ZCA factors from ``eigh`` with
  eigenvalues floored at ``lambda_max * 1e-6``, ``U S V^T = svd(Xw^T Yw)``, ``Q = U V^T``,
  ``s = sum(S) / ||Xw||_F^2``, ``map(h) = ((h - mu_b) Cb^-1/2 Q s) Ct^1/2 + mu_t``.

Zero-variance dimensions (train sd <= ``SD_EPS`` = 1e-6, absolute; docs/FORMATS.md says the same):

- ``recolour`` (the raw cross-patch, and rank 0 in delta mode) uses ratio 0 there: the output is ``mu_t``
  whatever the input, never a division by 0.
- ``ridge`` drops them: a constant base dim has a zero row of ``W`` (its input is ignored), a constant
  tuned dim a zero column (its output is ``mu_t``).
- ``procrustes`` / ``procrustes_scaled`` drop nothing: a direction without train variance is left
  unconstrained by the SVD and the orthogonal factor sends it to a direction orthogonal to the fitted ones
  (a unit row of ``W`` for procrustes; for procrustes_scaled scaled by ``s`` over the square root of the
  shrunk variance ``g tr(C)/d``, or of the eigenvalue floor when shrink = 0). Inputs at the train mean
  there (all train rows) are unaffected; inputs that depart from it are mapped arbitrarily.
- rank k: delta mode's complement recolour ``D_k`` uses ratio 0 where the base complement's sd <= 1e-6;
  in subspace mode such a direction has singular value 0 and is outside every rank below the full one.

Rank k has two modes; the SVD is done once and every rank is derived from stored factors (`at_rank`).

- ``subspace`` (the literal rank-k map, docs/ALGORITHMS.md 10.2): the truncated SVD of the solver's cross-covariance,
  ``Q_k = U[:, :k] V^T[:k]`` with ``s_k = sum_{i<=k} S_i / ||Xw||_F^2`` for procrustes_scaled, ``U_k V_k^T``
  for procrustes, and reduced-rank ridge (the fitted values projected on their top-k right singular vectors)
  for ridge. The rank-k map has matrix rank k; ``k = 0`` means full rank, as in docs/ALGORITHMS.md.
- ``delta`` (the default, used by patching): the rank-k map keeps the full map on the k directions the
  change needs and the raw per-dimension recolour everywhere else. With the raw cross-patch
  ``R(h) = ((h - mu_b) / sd_b) sd_t + mu_t`` and the full map ``M(h) = (h - mu_b) W + mu_t``:
  ``V`` are the right singular vectors of the training change ``Xc (W - I)`` (the map's departure from an
  unchanged site, ordered by the change's energy on the data), ``P_k = V_k V_k^T`` and
  ``map_k(h) = (h - mu_b) [D_k (I - P_k) + W P_k] + mu_t`` with the complement recolour
  ``D_k = diag(sd(Yc (I - P_k)) / sd(Xc (I - P_k)))``. So ``k = 0`` is exactly the raw cross-patch (0% KL
  drop by construction), ``k = None`` is the full map, and a change confined to r directions,
  ``Y = X (I + U A U^T)``, is recovered exactly at ``k = r`` (then ``D_r = I`` on the complement).

  Why deviate from the literal definition: fine-tuning leaves most directions of a site nearly unchanged. A
  literal rank-k map projects every input onto k directions, so it discards the unchanged directions too and
  cannot reproduce the tuned activation at any k << d, however few directions the tuning changed; "how many
  directions does the change need" is then unanswerable. Measuring rank on the change keeps everything the
  two models share and asks how many directions must be added to the raw cross-patch. Two refinements over
  the simplest form ``R(h) + C(h) V_k V_k^T`` with ``C = M - R`` were needed for a planted rank-r change to
  be recovered at k = r: a low-rank change also alters the per-dimension sd of *every* dimension, so
  ``M - R`` contains a full-rank diagonal part. Hence the basis is taken from ``W - I`` (not from
  ``W - diag(sd_t/sd_b)``, whose top singular vectors that diagonal part biases) and the recolour of the
  complement is re-estimated on the complement (``D_k``). In the known-answer test (a tiny Llama with a
  planted rank-4 edit) the simple form reached 80% of the full map's KL drop at k = 4 with principal cosines
  down to 0.8; this form reaches 100% with cosines >= 0.99.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.linalg import subspace_angles
from sklearn.covariance import shrunk_covariance
from sklearn.metrics import r2_score as _sk_r2

from mechdiff.analysis.similarity import linear_cka
from mechdiff.errors import MechdiffError
from mechdiff.io import to_jsonable
from mechdiff.stats.checks import as_f64, matrix

SOLVERS = ("ridge", "procrustes", "procrustes_scaled")
RANK_MODES = ("delta", "subspace")
SD_EPS = 1e-6
EIG_FLOOR = 1e-6
MAP_FILE = "map.safetensors"
CONFIG_FILE = "map.json"
FORMULA = "y = alpha * (h @ W + b)"
RECOLOUR_FORMULA = "raw cross-patch: y = ((h - mu_b) / sd_b) * sd_t + mu_t (0 where sd_b <= 1e-6)"
_STAT_KEYS = ("mu_b", "sd_b", "mu_t", "sd_t")


# --------------------------------------------------------------------------------------------- checks


def _pair(X: Any, Y: Any, what: str, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    x = matrix(X, f"{what} base activations", min_rows)
    y = matrix(Y, f"{what} tuned activations", min_rows)
    if x.shape[0] != y.shape[0]:
        raise MechdiffError(
            f"{what} base and tuned activations must have the same prompts (rows): got {x.shape[0]} and {y.shape[0]}"
        )
    return x, y


# --------------------------------------------------------------------------------------------- the map


def rank_value(r: int | str) -> int | None:
    """A rank setting (an int or 'full', as in params transport.ranks) as `TransportMap.at_rank` takes it."""
    return None if r == "full" else int(r)


@dataclass
class TransportMap:
    """An affine base -> tuned map at one site: apply(h) = alpha * (h @ W + b), at rank `rank` (None = full)."""

    solver: str
    site: str
    W: np.ndarray
    b: np.ndarray
    alpha: float = 1.0
    rank: int | None = None
    rank_mode: str = "delta"
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    basis: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    factors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def d_in(self) -> int:
        """Base width."""
        return int(self.W.shape[0])

    @property
    def d_out(self) -> int:
        """Tuned width."""
        return int(self.W.shape[1])

    @property
    def k_max(self) -> int:
        """The largest rank the stored factors can express."""
        for key in ("Rt", "V"):
            if key in self.factors:
                return int(self.factors[key].shape[1] if key == "V" else self.factors[key].shape[0])
        return 0

    def apply(self, H: Any) -> Any:
        """Map base activations (..., d_in) to tuned space; numpy in -> float64 numpy out, torch in -> torch out."""
        if hasattr(H, "detach") and hasattr(H, "dtype") and not isinstance(H, np.ndarray):
            import torch

            if H.shape[-1] != self.d_in:
                raise MechdiffError(f"map expects width {self.d_in}, got activations of width {H.shape[-1]}")
            W = torch.as_tensor(self.W, dtype=torch.float64, device=H.device)
            b = torch.as_tensor(self.b, dtype=torch.float64, device=H.device)
            return (self.alpha * (H.double() @ W + b)).to(H.dtype)
        h = as_f64(H, "activations")
        if h.shape[-1] != self.d_in:
            raise MechdiffError(f"map expects width {self.d_in}, got activations of width {h.shape[-1]}")
        if not np.isfinite(h).all():
            raise MechdiffError("activations to map contain NaN or inf")
        return self.alpha * (h @ self.W + self.b)

    def at_rank(self, k: int | str | None) -> TransportMap:
        """The map at rank k (None or 'full' = full map; in delta mode k = 0 is the raw cross-patch)."""
        if k is None or (isinstance(k, str) and k == "full"):
            W = self.factors["W_full"]
            return self._with_W(W, None)
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or int(k) < 0:
            raise MechdiffError(f"rank must be a non-negative integer, None or 'full', got {k!r}")
        k = int(k)
        f = self.factors
        if self.rank_mode == "subspace":
            if k == 0 or k >= self.k_max:
                return self._with_W(f["W_full"], None if k == 0 else k)
            return self._with_W(float(f["scales"][k - 1]) * (f["L"][:, :k] @ f["Rt"][:k]), k)
        if k == 0:
            return self._with_W(np.diag(_ratio(self.stats)), 0)
        if k >= self.k_max:
            return self._with_W(f["W_full"], k)
        return self._with_W(_delta_rank_W(f["W_full"], f["V"][:, :k], f["Cx"], f["Cy"]), k)

    def with_alpha(self, alpha: float) -> TransportMap:
        """The same map with another output scale alpha."""
        if isinstance(alpha, bool) or not np.isfinite(float(alpha)):
            raise MechdiffError(f"alpha must be a finite number, got {alpha!r}")
        return replace(self, alpha=float(alpha))

    def _with_W(self, W: np.ndarray, k: int | None) -> TransportMap:
        b = self.stats["mu_t"] - self.stats["mu_b"] @ W
        return replace(self, W=W, b=b, rank=k)


# --------------------------------------------------------------------------------------------- helpers


def recolour_stats(X_train: Any, Y_train: Any) -> dict[str, np.ndarray]:
    """Recolour statistics {mu_b, sd_b, mu_t, sd_t} (float64, population sd) of base / tuned TRAIN rows only.

    The one definition used by every recolour (the patch stage's raw cross-patch via the map's stats, and
    the RQ1 layer patch): validation rows are never part of the statistics they are evaluated with.
    """
    x, y = _pair(X_train, Y_train, "recolour (train)", min_rows=1)
    return {"mu_b": x.mean(axis=0), "sd_b": x.std(axis=0), "mu_t": y.mean(axis=0), "sd_t": y.std(axis=0)}


def _check_stats(stats: dict) -> dict[str, np.ndarray]:
    try:
        out = {k: np.asarray(stats[k], dtype=np.float64).ravel() for k in _STAT_KEYS}
    except (KeyError, TypeError) as exc:
        raise MechdiffError(f"recolour stats need the keys {', '.join(_STAT_KEYS)}") from exc
    if len({v.size for v in out.values()}) != 1:
        raise MechdiffError("recolour stats mu_b, sd_b, mu_t, sd_t must all have the same width")
    return out


def _ratio(stats: dict[str, np.ndarray]) -> np.ndarray:
    """sd_t / sd_b per dimension, 0 where the base dimension is constant."""
    sd_b = stats["sd_b"]
    keep = sd_b > SD_EPS
    r = np.zeros_like(sd_b)
    r[keep] = stats["sd_t"][keep] / sd_b[keep]
    return r


def recolour(H: Any, stats: dict) -> np.ndarray:
    """The raw cross-patch vector ((h - mu_b)/sd_b) sd_t + mu_t per dimension (mu_t where sd_b <= 1e-6)."""
    st = _check_stats(stats)
    h = as_f64(H, "activations")
    if h.shape[-1] != st["mu_b"].size:
        raise MechdiffError(f"recolour stats have width {st['mu_b'].size}, activations width {h.shape[-1]}")
    if not np.isfinite(h).all():
        raise MechdiffError("activations to recolour contain NaN or inf")
    return (h - st["mu_b"]) * _ratio(st) + st["mu_t"]


def zca_factors(C: np.ndarray, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """(C^-1/2, C^1/2) of the shrunk covariance (1-g) C + g tr(C)/d I, eigenvalues floored at lambda_max*1e-6."""
    Cs = shrunk_covariance(C, shrinkage=float(shrink))  # sklearn: (1-g) C + g tr(C)/d I
    e, E = np.linalg.eigh((Cs + Cs.T) / 2.0)
    top = max(float(e.max()), 0.0)
    if top <= 0.0:
        raise MechdiffError("activations are constant (zero covariance): nothing to map at this site")
    e = np.maximum(e, top * EIG_FLOOR)
    return (E / np.sqrt(e)) @ E.T, (E * np.sqrt(e)) @ E.T


def r2_score(Y: np.ndarray, P: np.ndarray) -> float:
    """Pooled R^2 = 1 - sum (Y - P)^2 / sum (Y - mean(Y))^2 (sklearn's 'variance_weighted'); NaN if Y is constant."""
    y, p = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    if y.shape[0] < 2 or not float(np.sum((y - y.mean(axis=0)) ** 2)) > 0.0:
        return float("nan")  # sklearn would return 0 or 1 (force_finite); an undefined R^2 stays undefined here
    return float(_sk_r2(y, p, multioutput="variance_weighted"))


def _orth_basis(Rt: np.ndarray) -> np.ndarray:
    """Orthonormal columns whose first k span the rows Rt[:k] for every k (QR with positive diagonal)."""
    q, r = np.linalg.qr(Rt.T)
    s = np.sign(np.diagonal(r))
    s[s == 0] = 1.0
    return q * s[None, :]


def _delta_rank_W(W: np.ndarray, Vk: np.ndarray, Cx: np.ndarray, Cy: np.ndarray) -> np.ndarray:
    """W_k = D_k (I - P_k) + W P_k: the full map on span(Vk), the per-dimension recolour of the rest.

    P_k = Vk Vk^T; D_k = diag(sd_j(Yc (I - P_k)) / sd_j(Xc (I - P_k))) from the train covariances (ddof 0);
    dimensions whose base complement has sd <= 1e-6 get ratio 0, as in `recolour`.
    """

    def comp_var(C: np.ndarray) -> np.ndarray:
        A = C @ Vk
        return np.diag(C) - 2.0 * np.sum(Vk * A, axis=1) + np.sum((Vk @ (Vk.T @ A)) * Vk, axis=1)

    vx, vy = np.maximum(comp_var(Cx), 0.0), np.maximum(comp_var(Cy), 0.0)
    keep = vx > SD_EPS**2
    ratio = np.zeros_like(vx)
    ratio[keep] = np.sqrt(vy[keep] / vx[keep])
    return np.diag(ratio) + ((W - np.diag(ratio)) @ Vk) @ Vk.T


def _top_eig(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, >= 0) and eigenvectors of a symmetric PSD matrix."""
    e, V = np.linalg.eigh((G + G.T) / 2.0)
    order = np.argsort(e)[::-1]
    return np.maximum(e[order], 0.0), V[:, order]


# --------------------------------------------------------------------------------------------- solvers


def _ridge_parts(x, y, st, lambdas, x_val, y_val, seed: int = 0):
    """z-scored ridge: (Wz embedded in raw coordinates, lambda, {lambda: val R^2})."""
    kx, ky = st["sd_b"] > SD_EPS, st["sd_t"] > SD_EPS
    if not kx.any() or not ky.any():
        raise MechdiffError("activations are constant on one side (every sd <= 1e-6): nothing to map")

    def z(a, mu, sd, keep):
        return (a - mu)[:, keep] / sd[keep]

    Xz, Yz = z(x, st["mu_b"], st["sd_b"], kx), z(y, st["mu_t"], st["sd_t"], ky)
    if x_val is None:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(x.shape[0])
        n_val = max(1, x.shape[0] // 5)
        vi, ti = perm[:n_val], perm[n_val:]
        if ti.size < 2:
            raise MechdiffError("ridge needs at least 3 train rows to pick lambda without a validation set")
        Xs, Ys, Xv, Yv = Xz[ti], Yz[ti], Xz[vi], Yz[vi]
    else:
        Xs, Ys = Xz, Yz
        Xv, Yv = z(x_val, st["mu_b"], st["sd_b"], kx), z(y_val, st["mu_t"], st["sd_t"], ky)

    def solve(Xa, Ya):
        U, S, Vt = np.linalg.svd(Xa, full_matrices=False)
        return Vt.T, S, U.T @ Ya

    V, S, UtY = solve(Xs, Ys)
    scores: dict[float, float] = {}
    for lam in lambdas:
        Wz = V @ ((S / (S**2 + lam))[:, None] * UtY)
        scores[float(lam)] = r2_score(Yv, Xv @ Wz)
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    best = max(finite, key=lambda k: finite[k]) if finite else float(lambdas[0])
    if x_val is None:
        V, S, UtY = solve(Xz, Yz)
    Wz = V @ ((S / (S**2 + best))[:, None] * UtY)
    # reduced-rank factors: right singular vectors of the fitted values Xz Wz
    ev, R = _top_eig(Wz.T @ (Xz.T @ Xz) @ Wz)
    d_b, d_t = x.shape[1], y.shape[1]
    W = np.zeros((d_b, d_t))
    W[np.ix_(kx, ky)] = Wz / st["sd_b"][kx][:, None] * st["sd_t"][ky][None, :]
    L = np.zeros((d_b, R.shape[1]))
    L[kx] = (Wz @ R) / st["sd_b"][kx][:, None]
    Rt = np.zeros((R.shape[1], d_t))
    Rt[:, ky] = R.T * st["sd_t"][ky][None, :]
    return W, L, Rt, np.ones(R.shape[1]), np.sqrt(ev), best, scores


def _procrustes_parts(x, y, st):
    xc, yc = x - st["mu_b"], y - st["mu_t"]
    U, S, Vt = np.linalg.svd(xc.T @ yc, full_matrices=False)
    return U @ Vt, U, Vt, np.ones(S.size), S


def _procrustes_scaled_parts(x, y, st, shrink):
    xc, yc = x - st["mu_b"], y - st["mu_t"]
    n = x.shape[0]
    Bm, _ = zca_factors(xc.T @ xc / (n - 1), shrink)
    Tm, Tp = zca_factors(yc.T @ yc / (n - 1), shrink)
    Xw, Yw = xc @ Bm, yc @ Tm
    U, S, Vt = np.linalg.svd(Xw.T @ Yw, full_matrices=False)
    nx = float(np.sum(Xw**2))
    if nx <= 0.0:
        raise MechdiffError("whitened base activations are all zero: nothing to map at this site")
    s = float(S.sum()) / nx
    L, Rt = Bm @ U, Vt @ Tp
    # rank k: the least-squares scale of the rank-k rotation Q_k = U_k V_k^T, sum_{i<=k} S_i / ||Xw U_k||_F^2
    # (||Xw Q_k||_F = ||Xw U_k||_F); at full rank with equal widths ||Xw U||_F = ||Xw||_F, so the last is s
    kept = np.cumsum(np.sum((Xw @ U) ** 2, axis=0))
    scales = np.divide(np.cumsum(S), kept, out=np.zeros_like(S), where=kept > 1e-12 * nx)
    return s * (L @ Rt), L, Rt, scales, S


def fit_map(
    X: Any, Y: Any, *, solver: str = "procrustes_scaled", shrink: float = 0.05,
    lambdas: tuple[float, ...] | list[float] = (1e-3, 1e-2, 1e-1, 1, 10, 100, 1000),
    X_val: Any = None, Y_val: Any = None, rank_mode: str = "delta", site: str = "",
) -> TransportMap:
    """Fit a base -> tuned map on train rows X (N, d_b), Y (N, d_t); the returned map is full rank (`at_rank`)."""
    if solver not in SOLVERS:
        raise MechdiffError(f"unknown transport solver {solver!r}: use one of {', '.join(SOLVERS)}")
    if rank_mode not in RANK_MODES:
        raise MechdiffError(f"unknown rank_mode {rank_mode!r}: use one of {', '.join(RANK_MODES)}")
    if isinstance(shrink, bool) or not 0.0 <= float(shrink) <= 1.0:
        raise MechdiffError(f"shrink must be in [0, 1], got {shrink!r}")
    x, y = _pair(X, Y, "train")
    xv = yv = None
    if (X_val is None) != (Y_val is None):
        raise MechdiffError("give both X_val and Y_val (validation base and tuned activations) or neither")
    if X_val is not None:
        xv, yv = _pair(X_val, Y_val, "validation", min_rows=1)
        if xv.shape[1] != x.shape[1] or yv.shape[1] != y.shape[1]:
            raise MechdiffError(
                f"validation widths {xv.shape[1]}/{yv.shape[1]} differ from train widths {x.shape[1]}/{y.shape[1]}"
            )
    if rank_mode == "delta" and x.shape[1] != y.shape[1]:
        raise MechdiffError(
            f"rank_mode='delta' needs equal widths (base {x.shape[1]}, tuned {y.shape[1]}): use rank_mode='subspace'"
        )
    st = recolour_stats(x, y)
    meta: dict[str, Any] = {"n_train": int(x.shape[0]), "shrink": float(shrink), "lambda": None}
    if solver == "ridge":
        lam = [float(v) for v in lambdas]
        if not lam or any(not np.isfinite(v) or v <= 0 for v in lam):
            raise MechdiffError(f"ridge lambdas must be a non-empty list of positive numbers, got {lambdas!r}")
        W, L, Rt, scales, sv, best, scores = _ridge_parts(x, y, st, lam, xv, yv)
        meta["lambda"] = best
        meta["lambda_r2"] = {str(k): v for k, v in scores.items()}
    elif solver == "procrustes":
        W, L, Rt, scales, sv = _procrustes_parts(x, y, st)
    else:
        W, L, Rt, scales, sv = _procrustes_scaled_parts(x, y, st, float(shrink))
    if rank_mode == "delta":
        xc, yc = x - st["mu_b"], y - st["mu_t"]
        Cx, Cy = xc.T @ xc / x.shape[0], yc.T @ yc / x.shape[0]
        delta = W - np.eye(W.shape[0])
        ev, V = _top_eig(delta.T @ Cx @ delta)
        tot = float(ev.sum())
        meta["change_energy"] = (np.cumsum(ev) / tot).tolist() if tot > 0 else [1.0] * ev.size
        factors = {"W_full": W, "V": V, "Cx": Cx, "Cy": Cy, "sv": np.sqrt(ev)}
        basis = V
    else:
        factors = {"W_full": W, "L": L, "Rt": Rt, "scales": scales, "sv": sv}
        basis = _orth_basis(Rt)
    meta["singular_values"] = factors["sv"].tolist()
    m = TransportMap(solver=solver, site=site, W=W, b=st["mu_t"] - st["mu_b"] @ W, alpha=1.0, rank=None,
                     rank_mode=rank_mode, stats=st, basis=basis, meta=meta, factors=factors)
    return m


# --------------------------------------------------------------------------------------------- alpha, diagnostics


def auto_alpha(m: TransportMap, X_val: Any, Y_val: Any) -> float:
    """alpha 'auto' = median_i ||y_i|| / ||map(h_i)|| on validation rows (map taken at alpha = 1)."""
    xv, yv = _pair(X_val, Y_val, "validation", min_rows=1)
    p = m.with_alpha(1.0).apply(xv)
    pn, yn = np.linalg.norm(p, axis=1), np.linalg.norm(yv, axis=1)
    ok = pn > 0
    if not ok.any():
        raise MechdiffError("the map sends every validation row to zero: cannot pick alpha automatically")
    return float(np.median(yn[ok] / pn[ok]))


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    den = na * nb
    return np.where(den > 0, np.sum(a * b, axis=1) / np.where(den > 0, den, 1.0), 0.0)


def diagnostics(m: TransportMap, X_tr: Any, Y_tr: Any, X_val: Any, Y_val: Any, *, seed: int = 0) -> dict:
    """Fit quality of map m: R^2 (train, val raw, val whitened, shuffled-val baseline), CKA and cosines on val.

    Cosines are between mapped and true tuned vectors centred by the tuned train mean (cos_raw_mean: uncentred).
    """
    xt, yt = _pair(X_tr, Y_tr, "train")
    xv, yv = _pair(X_val, Y_val, "validation")
    pt, pv = m.apply(xt), m.apply(xv)
    mu_t = yt.mean(axis=0)
    yc = yt - mu_t
    Tm, _ = zca_factors(yc.T @ yc / (yt.shape[0] - 1), float(m.meta.get("shrink", 0.05)))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(xv.shape[0])
    cos = _cos_rows(pv - mu_t, yv - mu_t)
    return {
        "r2_train": r2_score(yt, pt),
        "r2_val": r2_score(yv, pv),
        "r2_val_whitened": r2_score((yv - mu_t) @ Tm, (pv - mu_t) @ Tm),
        "r2_val_shuffled": r2_score(yv, pv[perm]),
        "r2_val_recolour": r2_score(yv, recolour(xv, m.stats)),
        "cka_val": linear_cka(pv, yv),
        "cos_mean": float(np.mean(cos)),
        "cos_median": float(np.median(cos)),
        "cos_p10": float(np.percentile(cos, 10)),
        "cos_p90": float(np.percentile(cos, 90)),
        "cos_raw_mean": float(np.mean(_cos_rows(pv, yv))),
        "n_train": int(xt.shape[0]),
        "n_val": int(xv.shape[0]),
    }


def fit_site(X: Any, Y: Any, train_rows: Any, val_rows: Any, *, solver: str = "procrustes_scaled",
             shrink: float = 0.05, rank_mode: str = "delta", site: str = "", seed: int = 0
             ) -> tuple[TransportMap, dict]:
    """The transport experiment at one site: fit on train rows, alpha 'auto' on val rows, diagnostics.

    X, Y are all prompts' base / tuned decision vectors; returns (map with alpha auto, {'alpha_auto', ...
    `diagnostics`}). Validation rows choose the ridge lambda and alpha, and score the map.
    """
    x, y = _pair(X, Y, f"site {site}" if site else "site")
    tr, va = np.asarray(train_rows, dtype=np.int64), np.asarray(val_rows, dtype=np.int64)
    if tr.size < 2 or va.size < 2:
        raise MechdiffError(f"site {site}: need >= 2 train and >= 2 val prompts, got {tr.size} and {va.size}: "
                            "check data.splits")
    m = fit_map(x[tr], y[tr], solver=solver, shrink=shrink, X_val=x[va], Y_val=y[va], rank_mode=rank_mode, site=site)
    m = m.with_alpha(auto_alpha(m, x[va], y[va]))
    return m, {"alpha_auto": m.alpha, **diagnostics(m, x[tr], y[tr], x[va], y[va], seed=seed)}


# --------------------------------------------------------------------------------------------- save / load


def save_map(m: TransportMap, out_dir: str | Path) -> None:
    """Write `map.safetensors` (W, b, recolour stats, basis, rank factors) and `map.json` (config) to out_dir."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"W": m.W, "b": m.b, **{k: m.stats[k] for k in _STAT_KEYS}}
    if m.basis is not None:
        tensors["basis"] = m.basis
    tensors.update({f"factor_{k}": v for k, v in m.factors.items()})
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(out / MAP_FILE))
    cfg = {
        "solver": m.solver, "site": m.site, "rank": m.rank, "rank_mode": m.rank_mode, "alpha": float(m.alpha),
        "shrink": m.meta.get("shrink"), "lambda": m.meta.get("lambda"), "d_in": m.d_in, "d_out": m.d_out,
        "formula": FORMULA, "recolour": RECOLOUR_FORMULA, "meta": to_jsonable(m.meta),
    }
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_map(out_dir: str | Path) -> TransportMap:
    """Load a map written by `save_map`."""
    from safetensors.numpy import load_file

    out = Path(out_dir)
    if not (out / MAP_FILE).is_file() or not (out / CONFIG_FILE).is_file():
        raise MechdiffError(f"no transport map in {out}: expected {MAP_FILE} and {CONFIG_FILE} (run the transport stage)")
    t = load_file(str(out / MAP_FILE))
    cfg = json.loads((out / CONFIG_FILE).read_text())
    factors = {k[len("factor_"):]: v for k, v in t.items() if k.startswith("factor_")}
    return TransportMap(
        solver=cfg["solver"], site=cfg.get("site", ""), W=t["W"], b=t["b"], alpha=float(cfg["alpha"]),
        rank=cfg.get("rank"), rank_mode=cfg.get("rank_mode", "delta"), stats={k: t[k] for k in _STAT_KEYS},
        basis=t.get("basis"), meta=cfg.get("meta", {}), factors=factors,
    )


# --------------------------------------------------------------------------------------------- subspaces


def _span(A: np.ndarray, what: str) -> np.ndarray:
    """A as a finite (d, k) float64 matrix of column vectors (scipy drops rank-deficient directions)."""
    a = as_f64(A, what)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[1] == 0 or not np.isfinite(a).all():
        raise MechdiffError(f"{what} must be a finite (d, k) matrix of column vectors, got shape {a.shape}")
    return a


def principal_cosines(A: Any, B: Any) -> np.ndarray:
    """Cosines of the principal angles between the column spans of A (d, ka) and B (d, kb), largest first."""
    a, b = _span(A, "A"), _span(B, "B")
    if a.shape[0] != b.shape[0]:
        raise MechdiffError(f"A and B must have the same number of rows (width): {a.shape[0]} vs {b.shape[0]}")
    return np.clip(np.sort(np.cos(subspace_angles(a, b)))[::-1], 0.0, 1.0)
