"""Steering and ablation along a few directions: direction finders, fitted handles, one hook-based intervention.

Definitions (float64, rows are prompts; every direction finder returns a (d, k) matrix with orthonormal
columns):

- ``mean_difference(X_a, X_b) -> (d,)``: mean(X_a) - mean(X_b).
- ``svd_basis(rows, k)``: top-k right singular vectors of the (uncentred) rows; column signs fixed so each has
  a non-negative dot product with the mean row (ties: largest-|.| entry positive). k > rank available ->
  MechdiffError. The rank available is the numerical rank of the rows (singular values above
  ``S_max * max(n, d) * eps``, numpy.linalg.matrix_rank's tolerance): a direction without energy is never
  returned as if it were one.
- ``dim_directions(X_target, groups, X_control, k)``: difference in means extended to rank k: direction 1 =
  normalised mean_difference(X_target, X_control); the class-conditional differences
  d_g = mean(X_target[groups == g]) - mean(X_control) for each target group g, with direction 1 projected out,
  give directions 2..k by `svd_basis`. So k = 1 is exactly the difference in means. (The caller passes
  X = paired tuned - base activation changes, or raw activations; the function is generic.) Too few groups
  for k -> MechdiffError saying how many groups there are. (The overall difference is a weighted mean of the
  d_g, so with direction 1 projected out G groups leave at most G - 1 directions: k <= G.)
- ``delta_directions(delta, k)``: `svd_basis` of paired changes (tuned - base activations of the same prompts).
- ``transport_directions(m, k)``: the map's top-k change directions in the tuned space. In rank_mode
  'delta' these are ``m.factors["V"][:, :k]``, the right singular vectors of the training change
  ``Xc (W - I)`` that `transport._delta_rank_W` keeps the full map on (``P_k = V_k V_k^T``); in rank_mode
  'subspace' ``m.basis[:, :k]``, the orthonormal basis of the top-k output factors ``Rt[:k]``. Either is
  re-orthonormalised by QR (positive diagonal, so an orthonormal basis comes back unchanged).
- ``sae_directions(W_dec (n_latents, d), scores (n_latents,), k)``: decoder rows of the k highest-scoring
  latents (ties: lower index first), orthonormalised by QR in score order (positive diagonal: column i has a
  positive dot product with the i-th decoder row).

Handles and the one operation:

- ``Handle(site, V (d, k), A (k, k), b (k,))``; ``shift(t, h, alpha) = t + alpha * V (A V^T t + b)`` on the
  last dim of a torch tensor, computed in float64 for float64 tensors and float32 otherwise, returned in the
  tensor's dtype (V, A, b cached as tensors on the tensor's device).
- ``fit_handle(site, V, X_from, X_to, affine=True, ridge=1e-6)``: least squares on the subspace coordinates,
  ``V^T (x_to - x_from) ~= A V^T x_from + b`` over the paired rows, solved by numpy.linalg.lstsq with an
  unpenalised intercept and ridge ``ridge * trace(Zc^T Zc) / k`` (Zc: centred coordinates V^T x_from, so the
  penalty is relative to their scale). affine=False: A = 0, b = the mean change V^T (x_to - x_from).
- **Steer** the base toward the tuned model = handles fitted with X_from = base, X_to = tuned activations;
  **ablate** in the tuned model (remove the tuned - base component within the k-dim subspace) = handles
  fitted with X_from = tuned, X_to = base. Same `shift`. For a planted edit out' = out (I + s U U^T) with
  V = U this gives A = s I (steer) and A = -s/(1+s) I (ablate), b = 0, exactly.
- ``intervention(handles, alpha, gate=None)`` -> an `Intervene`: ``(model, start) -> context manager``,
  start a (B,) long tensor of positions in the batch's padded frame. Inside the context (one `edit_at` per
  handle, in order; handles at one site apply one after the other) a forward call whose sequence length
  T > 1 is modified at positions >= start[b] of row b; a call with T == 1 (a KV-cache decode step) is
  modified at every position. With a `gate`, the gate decides per row at the prefill call (T > 1) from the
  activation at its site at position start[b], read before any modification at that site (its hook is
  registered first); the decision is kept for the decode steps of the same batch, and rows the gate rejects
  are left unmodified. The gate's site must be at or before the first handle's site in forward order
  (resid_pre < attn_out < mlp_out < resid_post within a block).
- ``Gate`` / ``fit_gate``: sklearn LogisticRegression on standardised features (positive class = X_pos = rows
  to modify); accepts a row when ``((x - mean) / scale) . coef + intercept > 0``.

Effect helpers: ``gap_closed(base_val, tuned_val, new_val) = (new - base) / (tuned - base)`` (steering: the
share of the base -> tuned gap the intervention closes; ablation: call gap_closed(tuned_val, base_val,
new_val), the share of the change removed); NaN when |tuned - base| <= eps (`stats.bootstrap.drop_pct`'s
floor: a share of nothing is undefined). ``min_k_within`` picks the smallest k reaching a target within
budget; ``choose_alpha`` the alpha whose dev effect comes closest to the goal, 1 (the largest effect up to 1; an
effect past 1 overshoots and counts as far from the goal as it lies beyond it, so 1.3 ranks with 0.7), within
budget (ties: the smaller alpha; none within budget, or none with a finite effect: the smallest alpha, the most
conservative setting).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mechdiff.analysis.behaviour import Intervene
from mechdiff.analysis.transport import TransportMap
from mechdiff.errors import MechdiffError
from mechdiff.model.sites import SharedPrefix, Site, capture, edit_at
from mechdiff.model.tokens import Encoded, batches
from mechdiff.stats.bootstrap import drop_pct
from mechdiff.stats.checks import as_f64, matrix

FORWARD_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


# --------------------------------------------------------------------------------------------- checks


def _k(k: Any, what: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or int(k) < 1:
        raise MechdiffError(f"{what} must be an integer >= 1 (number of directions), got {k!r}")
    return int(k)


def _site(site: Any) -> Site:
    if isinstance(site, Site):
        return site
    if isinstance(site, str):
        return Site.parse(site)
    raise MechdiffError(f"site must be a Site or a name like 'L2.attn_out', got {type(site).__name__}")


def _vector(x: Any, what: str, n: int | None = None) -> np.ndarray:
    a = as_f64(x, what)
    if a.ndim != 1 or a.size == 0 or (n is not None and a.size != n):
        want = f"({n},)" if n is not None else "non-empty 1-D"
        raise MechdiffError(f"{what} must be a {want} vector, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise MechdiffError(f"{what} contains NaN or inf")
    return a


def _same_width(a: np.ndarray, b: np.ndarray, what_a: str, what_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise MechdiffError(f"{what_a} and {what_b} must have the same width, got {a.shape[1]} and {b.shape[1]}")


def _orthonormal(V: Any, what: str) -> np.ndarray:
    v = matrix(V, what)
    if v.shape[1] > v.shape[0]:
        raise MechdiffError(f"{what} must be (d, k) with k <= d, got shape {v.shape}")
    if not np.allclose(v.T @ v, np.eye(v.shape[1]), atol=1e-6):
        raise MechdiffError(f"{what} must have orthonormal columns: build it with a direction finder (svd_basis, ...)")
    return v


def forward_key(site: Site) -> tuple[int, int]:
    """Sort key of sites in the order a forward pass reaches them (layer, then resid_pre, attn_out, ...)."""
    return site.layer, FORWARD_ORDER[site.kind]


# --------------------------------------------------------------------------------------------- directions


def mean_difference(X_a: Any, X_b: Any) -> np.ndarray:
    """mean(X_a) - mean(X_b), (d,) float64."""
    a, b = matrix(X_a, "X_a"), matrix(X_b, "X_b")
    _same_width(a, b, "X_a", "X_b")
    return a.mean(axis=0) - b.mean(axis=0)


def svd_basis(rows: Any, k: int) -> np.ndarray:
    """Top-k right singular vectors (d, k) of the uncentred rows, signs fixed (see the module docstring)."""
    k = _k(k)
    x = matrix(rows, "rows")
    _, S, Vt = np.linalg.svd(x, full_matrices=False)
    tol = float(S.max(initial=0.0)) * max(x.shape) * np.finfo(np.float64).eps
    rank = int(np.sum(S > tol))
    if k > rank:
        raise MechdiffError(f"k={k} exceeds the rank available ({rank}) of the {x.shape[0]} x {x.shape[1]} rows: "
                            f"ask for at most {rank} directions")
    V = Vt[:k].T.copy()
    mean = x.mean(axis=0)
    tie = 1e-12 * float(np.linalg.norm(mean))
    for j in range(k):
        dot = float(mean @ V[:, j])
        if abs(dot) > tie:
            sign = np.sign(dot)
        else:
            sign = np.sign(V[np.argmax(np.abs(V[:, j])), j]) or 1.0
        V[:, j] *= sign
    return V


def dim_directions(X_target: Any, groups: Any, X_control: Any, k: int) -> np.ndarray:
    """Difference in means extended to rank k (d, k): the normalised mean difference, then group differences."""
    k = _k(k)
    xt, xc = matrix(X_target, "X_target"), matrix(X_control, "X_control")
    _same_width(xt, xc, "X_target", "X_control")
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != xt.shape[0]:
        raise MechdiffError(f"groups must give one label per X_target row ({xt.shape[0]}), got shape {g.shape}")
    md = mean_difference(xt, xc)
    norm = float(np.linalg.norm(md))
    if not norm > 0.0:
        raise MechdiffError("the target and control means are equal: there is no difference-in-means direction")
    v1 = md / norm
    if k == 1:
        return v1[:, None]
    labels = np.unique(g)
    if k > labels.size:
        raise MechdiffError(f"dim_directions k={k} needs at least {k} target groups (direction 1 plus one per "
                            f"further group difference); there are {labels.size}: lower k or add groups")
    mu_c = xc.mean(axis=0)
    D = np.stack([xt[g == lab].mean(axis=0) - mu_c for lab in labels])
    D = D - np.outer(D @ v1, v1)
    try:
        rest = svd_basis(D, k - 1)
    except MechdiffError as exc:
        raise MechdiffError(f"dim_directions k={k}: the {labels.size} group differences, direction 1 projected "
                            f"out, do not span {k - 1} more directions ({exc})") from None
    return np.column_stack([v1, rest])


def delta_directions(delta: Any, k: int) -> np.ndarray:
    """`svd_basis` (d, k) of paired changes (tuned - base activations of the same prompts)."""
    return svd_basis(matrix(delta, "delta (tuned - base activations)"), k)


def _qr_positive(M: np.ndarray) -> np.ndarray:
    q, r = np.linalg.qr(M)
    diag = np.diagonal(r)
    if np.any(np.abs(diag) <= 1e-10 * max(float(np.abs(diag).max(initial=0.0)), 1e-300)):
        raise MechdiffError("the chosen directions are linearly dependent: they span fewer than k dimensions")
    return q * np.sign(diag)[None, :]


def transport_directions(m: TransportMap, k: int) -> np.ndarray:
    """The map's top-k change directions (d_tuned, k) in the tuned space (see the module docstring)."""
    if not isinstance(m, TransportMap):
        raise MechdiffError(f"m must be a transport.TransportMap, got {type(m).__name__}")
    k = _k(k)
    basis = m.factors.get("V") if m.rank_mode == "delta" else m.basis
    if basis is None:
        raise MechdiffError(f"transport map {m.site or ''} has no change basis: refit it with transport.fit_map")
    basis = matrix(basis, "transport basis")
    if k > basis.shape[1]:
        raise MechdiffError(f"k={k} exceeds the {basis.shape[1]} directions the transport map stores")
    sv = m.factors.get("sv")
    if sv is not None and len(sv) >= k and float(sv[0]) > 0 and not float(sv[k - 1]) > 1e-12 * float(sv[0]):
        n_pos = int(np.sum(np.asarray(sv) > 1e-12 * float(sv[0])))
        raise MechdiffError(f"k={k} exceeds the rank of the transport map's change ({n_pos}): use k <= {n_pos}")
    return _qr_positive(basis[:, :k])


def sae_directions(W_dec: Any, scores: Any, k: int) -> np.ndarray:
    """Decoder rows of the k highest-scoring latents, orthonormalised by QR in score order, (d, k)."""
    k = _k(k)
    W = matrix(W_dec, "W_dec (n_latents, d)")
    s = _vector(scores, "scores", W.shape[0])
    if k > min(W.shape):
        raise MechdiffError(f"k={k} exceeds min(n_latents, d) = {min(W.shape)} of W_dec {W.shape}")
    top = np.argsort(-s, kind="stable")[:k]
    return _qr_positive(W[top].T)


# --------------------------------------------------------------------------------------------- handles


@dataclass
class Handle:
    """A fitted intervention at one site: t -> t + alpha V (A V^T t + b)."""

    site: Site
    V: np.ndarray  # (d, k) orthonormal columns
    A: np.ndarray  # (k, k)
    b: np.ndarray  # (k,)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.site = _site(self.site)
        self.V = matrix(self.V, "Handle.V (d, k)")
        k = self.V.shape[1]
        self.A = matrix(self.A, "Handle.A (k, k)")
        if self.A.shape != (k, k):
            raise MechdiffError(f"Handle.A must be ({k}, {k}) for V of shape {self.V.shape}, got {self.A.shape}")
        self.b = _vector(self.b, "Handle.b", k)

    @property
    def d(self) -> int:
        """Width of the site."""
        return int(self.V.shape[0])

    @property
    def k(self) -> int:
        """Number of directions."""
        return int(self.V.shape[1])

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(V, A, b) as tensors on `device` in `dtype` (cached)."""
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = tuple(torch.as_tensor(a, dtype=dtype, device=device) for a in (self.V, self.A, self.b))
        return self._cache[key]

    def to_json(self) -> dict:
        """JSON-ready dict (arrays as nested lists)."""
        return {"site": self.site.name, "V": self.V.tolist(), "A": self.A.tolist(), "b": self.b.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> Handle:
        """Inverse of `to_json`."""
        try:
            return cls(Site.parse(d["site"]), np.asarray(d["V"], dtype=np.float64),
                       np.asarray(d["A"], dtype=np.float64), np.asarray(d["b"], dtype=np.float64))
        except KeyError as exc:
            raise MechdiffError(f"handle JSON lacks the key {exc}: it needs site, V, A and b") from None


def fit_handle(site: Site, V: Any, X_from: Any, X_to: Any, *, affine: bool = True, ridge: float = 1e-6) -> Handle:
    """Fit V^T (x_to - x_from) ~= A V^T x_from + b by least squares over paired rows (affine=False: A = 0)."""
    v = _orthonormal(V, "V")
    xf = matrix(X_from, "X_from", 2 if affine else 1)
    xt = matrix(X_to, "X_to", 2 if affine else 1)
    if xf.shape != xt.shape:
        raise MechdiffError(f"X_from and X_to must be paired rows of one shape, got {xf.shape} and {xt.shape}")
    if xf.shape[1] != v.shape[0]:
        raise MechdiffError(f"activations have width {xf.shape[1]} but V has {v.shape[0]} rows: same site?")
    if isinstance(ridge, bool) or not np.isfinite(float(ridge)) or float(ridge) < 0:
        raise MechdiffError(f"ridge must be a finite number >= 0, got {ridge!r}")
    k = v.shape[1]
    Z, Y = xf @ v, (xt - xf) @ v
    if not affine:
        return Handle(_site(site), v, np.zeros((k, k)), Y.mean(axis=0))
    zm, ym = Z.mean(axis=0), Y.mean(axis=0)
    Zc, Yc = Z - zm, Y - ym
    lam = float(ridge) * float(np.sum(Zc**2)) / k
    lhs = np.vstack([Zc, np.sqrt(lam) * np.eye(k)]) if lam > 0 else Zc
    rhs = np.vstack([Yc, np.zeros((k, k))]) if lam > 0 else Yc
    coef, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)  # Yc ~= Zc coef, coef = A^T
    A = coef.T
    return Handle(_site(site), v, A, ym - A @ zm)


def mean_ablation_handle(site: Site, V: Any, X_base: Any) -> Handle:
    """The directional ablation x - V V^T (x - mean(X_base)) as a handle (A = -I, b = V^T mean(X_base)): at
    alpha = 1 every row's coordinates in the subspace become the base mean's, the rest of the row unchanged."""
    v = _orthonormal(V, "V")
    xb = matrix(X_base, "X_base", 1)
    if xb.shape[1] != v.shape[0]:
        raise MechdiffError(f"activations have width {xb.shape[1]} but V has {v.shape[0]} rows: same site?")
    return Handle(_site(site), v, -np.eye(v.shape[1]), xb.mean(axis=0) @ v)


def shift(t: torch.Tensor, h: Handle, alpha: float) -> torch.Tensor:
    """t + alpha * V (A V^T t + b) on the last dim (float64 for float64 tensors, else float32; t's dtype out)."""
    if t.shape[-1] != h.d:
        raise MechdiffError(f"handle at {h.site.name} has width {h.d} but the activation has width {t.shape[-1]}")
    cd = torch.float64 if t.dtype == torch.float64 else torch.float32
    V, A, b = h.tensors(t.device, cd)
    x = t.to(cd)
    return (x + float(alpha) * (((x @ V) @ A.T + b) @ V.T)).to(t.dtype)


# --------------------------------------------------------------------------------------------- gate


@dataclass
class Gate:
    """A linear gate at one site: accepts x when ((x - mean) / scale) . coef + intercept > 0."""

    site: Site
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    train_accuracy: float = float("nan")
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.site = _site(self.site)
        self.coef = _vector(self.coef, "Gate.coef")
        d = self.coef.size
        self.mean = _vector(self.mean, "Gate.mean", d)
        self.scale = _vector(self.scale, "Gate.scale", d)
        if np.any(self.scale <= 0):
            raise MechdiffError("Gate.scale must be positive (standard deviations; 1 for constant features)")
        self.intercept = float(self.intercept)
        if not np.isfinite(self.intercept):
            raise MechdiffError(f"Gate.intercept must be finite, got {self.intercept}")

    def decision_function(self, X: Any) -> np.ndarray:
        """The gate's logit per row (> 0: accept)."""
        x = matrix(np.atleast_2d(as_f64(X, "gate input")), "gate input")
        if x.shape[1] != self.coef.size:
            raise MechdiffError(f"gate at {self.site.name} expects width {self.coef.size}, got {x.shape[1]}")
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def predict(self, X: Any) -> np.ndarray:
        """Boolean accept per row (offline check of the gate)."""
        return self.decision_function(X) > 0.0

    def accepts(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean accept per row of a (B, d) tensor, evaluated in torch (float64 if x is, else float32)."""
        if x.shape[-1] != self.coef.size:
            raise MechdiffError(f"gate at {self.site.name} expects width {self.coef.size}, got {x.shape[-1]}")
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (str(x.device), cd)
        if key not in self._cache:
            self._cache[key] = tuple(torch.as_tensor(a, dtype=cd, device=x.device)
                                     for a in (self.mean, self.scale, self.coef))
        mu, sd, w = self._cache[key]
        return ((x.to(cd) - mu) / sd) @ w + self.intercept > 0

    def to_json(self) -> dict:
        """JSON-ready dict."""
        return {"site": self.site.name, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept, "train_accuracy": float(self.train_accuracy)}

    @classmethod
    def from_json(cls, d: dict) -> Gate:
        """Inverse of `to_json`."""
        try:
            return cls(Site.parse(d["site"]), d["mean"], d["scale"], d["coef"], d["intercept"],
                       float(d.get("train_accuracy", float("nan"))))
        except KeyError as exc:
            raise MechdiffError(f"gate JSON lacks the key {exc}: it needs site, mean, scale, coef, intercept") from None


def fit_gate(site: Site, X_pos: Any, X_neg: Any, *, seed: int = 0, C: float = 1.0) -> Gate:
    """Logistic regression (standardised features) accepting X_pos rows (to modify) and rejecting X_neg rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xp, xn = matrix(X_pos, "X_pos"), matrix(X_neg, "X_neg")
    _same_width(xp, xn, "X_pos", "X_neg")
    if isinstance(C, bool) or not np.isfinite(float(C)) or float(C) <= 0:
        raise MechdiffError(f"C (inverse regularisation) must be a positive number, got {C!r}")
    X = np.vstack([xp, xn])
    y = np.r_[np.ones(len(xp), dtype=int), np.zeros(len(xn), dtype=int)]
    sc = StandardScaler().fit(X)
    clf = LogisticRegression(C=float(C), random_state=int(seed), max_iter=2000).fit(sc.transform(X), y)
    g = Gate(_site(site), sc.mean_, sc.scale_, clf.coef_[0], float(clf.intercept_[0]))
    g.train_accuracy = float(np.mean(g.predict(X) == y.astype(bool)))
    return g


# --------------------------------------------------------------------------------------------- intervention


# `Intervene` (model, start) -> context manager: the protocol of mechdiff.analysis.behaviour


def _start(start: Any) -> torch.Tensor:
    s = torch.as_tensor(start)
    if s.dim() != 1 or s.dtype.is_floating_point or s.dtype == torch.bool:
        raise MechdiffError(f"start must be a (B,) integer tensor of positions, got {tuple(s.shape)} {s.dtype}")
    if s.numel() and int(s.min()) < 0:
        raise MechdiffError("start positions must be >= 0")
    return s.long()


def intervention(handles: Sequence[Handle], alpha: float, *, gate: Gate | None = None) -> Intervene:
    """The one intervention: every handle's `shift` at alpha, from each row's start position (see the module docstring)."""
    hs = list(handles)
    for h in hs:
        if not isinstance(h, Handle):
            raise MechdiffError(f"handles must be steering.Handle objects, got {type(h).__name__}")
    if isinstance(alpha, bool) or not np.isfinite(float(alpha)):
        raise MechdiffError(f"alpha must be a finite number, got {alpha!r}")
    a = float(alpha)
    if gate is not None:
        if not isinstance(gate, Gate):
            raise MechdiffError(f"gate must be a steering.Gate, got {type(gate).__name__}")
        if hs:
            first = min((h.site for h in hs), key=forward_key)
            if forward_key(gate.site) > forward_key(first):
                raise MechdiffError(f"gate site {gate.site.name} comes after the first handle site {first.name}: "
                                    "the gate must read its activation before any handle modifies the forward")

    def make(model: nn.Module, start: torch.Tensor) -> AbstractContextManager[None]:
        return _intervene(model, _start(start), hs, a, gate)

    # every hook sits on the block of its site or inside it: the blocks below compute what they compute without it
    sites = [h.site for h in hs] + ([gate.site] if gate is not None else [])
    make.first_block = min((st.layer for st in sites), default=0)
    return make


@contextlib.contextmanager
def _intervene(model: nn.Module, start: torch.Tensor, hs: list[Handle], alpha: float, gate: Gate | None
               ) -> Iterator[None]:
    state: dict[str, torch.Tensor | None] = {"keep": None}

    def check(t: torch.Tensor, name: str) -> None:
        if t.dim() != 3:
            raise MechdiffError(f"activation at {name} has shape {tuple(t.shape)}, expected (batch, tokens, width)")
        if t.shape[1] > 1 and start.shape[0] != t.shape[0]:
            raise MechdiffError(f"start has {start.shape[0]} positions but the batch has {t.shape[0]} rows")

    def read_gate(t: torch.Tensor) -> None:
        check(t, gate.site.name)
        if t.shape[1] > 1:
            s = start.to(t.device)
            if int(s.max()) >= t.shape[1]:
                raise MechdiffError(f"a start position ({int(s.max())}) is beyond the sequence length {t.shape[1]}")
            state["keep"] = gate.accepts(t[torch.arange(t.shape[0], device=t.device), s])
        return None

    def mask(t: torch.Tensor) -> torch.Tensor:
        B, T = t.shape[0], t.shape[1]
        if T > 1:
            m = torch.arange(T, device=t.device)[None, :] >= start.to(t.device)[:, None]
        else:
            m = torch.ones((B, 1), dtype=torch.bool, device=t.device)
        if gate is not None:
            keep = state["keep"]
            if keep is None:
                raise MechdiffError("the gate has not seen this batch: run the prompt (a forward with T > 1) "
                                    "before decode steps")
            if keep.shape[0] != B:
                raise MechdiffError(f"the gate decided for {keep.shape[0]} rows but this step has {B}")
            m = m & keep.to(t.device)[:, None]
        return m

    def edit(h: Handle) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(t: torch.Tensor) -> torch.Tensor:
            check(t, h.site.name)
            return torch.where(mask(t)[..., None], shift(t, h, alpha), t)

        return fn

    with contextlib.ExitStack() as stack:
        if gate is not None and hs:
            stack.enter_context(edit_at(model, gate.site, read_gate))  # registered first: reads before any edit
        for h in hs:
            stack.enter_context(edit_at(model, h.site, edit(h)))
        yield


# --------------------------------------------------------------------------------------------- activations


def collect_decision_acts(model: nn.Module, enc: Encoded, rows: Any, sites: Sequence[Site | str], *,
                          batch_size: int = 16, intervene: Intervene | None = None) -> dict[str, np.ndarray]:
    """{site name: (len(rows), d) float64} activations at each prompt's decision token, in `rows` order.

    With `intervene` (an `intervention`), read while it acts from each prompt's decision token on (an
    intervention wrapped by `steer_eval.from_first` acts from the first token): what a site downstream of
    the intervention's handles sees. Full forwards then, without the shared-opening cache."""
    if not isinstance(enc, Encoded):
        raise MechdiffError(f"enc must be a mechdiff.model.tokens.Encoded, got {type(enc).__name__}")
    r = np.asarray(rows, dtype=np.int64).ravel()
    if r.size == 0:
        raise MechdiffError("no prompts: the row selection is empty")
    if r.min() < 0 or r.max() >= len(enc):
        raise MechdiffError(f"prompt rows out of range: the encoded corpus has {len(enc)} prompts")
    ss = list(dict.fromkeys(_site(s) for s in sites))
    if not ss:
        raise MechdiffError("no sites given: name at least one site to read")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    sub = Encoded([enc.ids[i] for i in r], [enc.decision[i] for i in r], enc.pad)
    out: dict[str, np.ndarray] = {}
    # the prompts' shared opening (a chat template's) runs once when there are enough prompts to pay for it
    pre = SharedPrefix.checked(model, sub, ss, pass_mask=True, device=device) \
        if r.size > 2 * batch_size and intervene is None else None
    P = pre.n if pre is not None else 0
    for pos_rows, ids, mask, pos in batches(sub, np.arange(r.size), batch_size, sub.pad, device):
        if intervene is not None:
            with intervene(model, pos):
                acts, _ = capture(model, ids, mask, ss)
        else:
            acts, _ = pre.capture(model, ids, mask, ss) if pre is not None else capture(model, ids, mask, ss)
        ar = torch.arange(len(pos_rows), device=device)
        for s in ss:
            a = acts[s.name][ar, pos - P].double().cpu().numpy()
            if s.name not in out:
                out[s.name] = np.zeros((r.size, a.shape[1]))
            out[s.name][pos_rows] = a
    return out


# --------------------------------------------------------------------------------------------- effects


def gap_closed(base_val: float, tuned_val: float, new_val: float, *, eps: float = 1e-9) -> float:
    """(new - base) / (tuned - base); NaN when |tuned - base| <= eps. Ablation: gap_closed(tuned, base, new)."""
    b, t, n = float(base_val), float(tuned_val), float(new_val)
    if not np.isfinite(n):
        return float("nan")
    return drop_pct(t - b, t - n, floor=float(eps)) / 100.0


def min_k_within(ks: Sequence[int], effects: Sequence[float], within_budget: Sequence[bool],
                 target: float) -> int | None:
    """The smallest k whose effect >= target and that is within budget; None if none (NaN never reaches)."""
    if not len(ks) == len(effects) == len(within_budget):
        raise MechdiffError(f"ks, effects and within_budget must have one entry per k, got {len(ks)}, "
                            f"{len(effects)} and {len(within_budget)}")
    hits = [int(k) for k, e, w in zip(ks, effects, within_budget)
            if bool(w) and e is not None and np.isfinite(e) and e >= target]
    return min(hits) if hits else None


def choose_alpha(alphas: Sequence[float], dev_effects: Sequence[float], within_budget: Sequence[bool]) -> float:
    """The alpha whose dev effect within budget lies closest to 1, the goal model's value (|1 - effect|: an overshoot
    past the goal is as far from it as the same shortfall; ties: smaller alpha); none within budget: the smallest."""
    if not len(alphas) == len(dev_effects) == len(within_budget) or len(alphas) == 0:
        raise MechdiffError(f"alphas, dev_effects and within_budget must be non-empty with one entry per alpha, got "
                            f"{len(alphas)}, {len(dev_effects)} and {len(within_budget)}")
    al = [float(a) for a in alphas]
    ok = [(e, a) for a, e, w in zip(al, dev_effects, within_budget)
          if bool(w) and e is not None and np.isfinite(e)]
    if not ok:
        return min(al)
    return min(ok, key=lambda ea: (round(abs(1.0 - float(ea[0])), 12), ea[1]))[1]  # rounded: 1.2 and 0.8 tie


__all__ = [
    "FORWARD_ORDER", "Gate", "Handle", "Intervene", "choose_alpha", "collect_decision_acts", "delta_directions",
    "dim_directions", "fit_gate", "fit_handle", "forward_key", "gap_closed", "intervention", "mean_ablation_handle",
    "mean_difference", "min_k_within", "sae_directions", "shift", "svd_basis", "transport_directions",
]
