"""Steering: direction finders, fitted handles, the intervention protocol and the planted-edit known answers."""

import contextlib
import copy

import numpy as np
import pytest
import torch

from mechdiff.analysis.steering import (
    Gate,
    Handle,
    choose_alpha,
    collect_decision_acts,
    delta_directions,
    dim_directions,
    fit_gate,
    fit_handle,
    gap_closed,
    intervention,
    mean_ablation_handle,
    mean_difference,
    min_k_within,
    sae_directions,
    shift,
    svd_basis,
    transport_directions,
)
from mechdiff.analysis.transport import fit_map, principal_cosines
from mechdiff.errors import MechdiffError
from mechdiff.model.recipes import plant_edit, random_directions
from mechdiff.model.sites import Site, capture, read_at
from mechdiff.model.tokens import batches
from mechdiff.stats.kl import kl_divergence

N_PROMPTS, N_TRAIN, D, R, SCALE = 150, 100, 64, 2, 8.0


def _one_line(exc_info) -> None:
    assert "\n" not in str(exc_info.value) and str(exc_info.value)


# --------------------------------------------------------------------------------------------- directions


def test_mean_difference_recovers_planted_shift():
    rng = np.random.default_rng(0)
    d = 32
    mu = rng.normal(size=d)
    mu *= 3.0 / np.linalg.norm(mu)
    X_a = rng.normal(size=(2000, d)) + mu + 1.5
    X_b = rng.normal(size=(2000, d)) + 1.5
    md = mean_difference(X_a, X_b)
    cos = md @ mu / (np.linalg.norm(md) * np.linalg.norm(mu))
    assert cos >= 0.99, cos
    assert abs(np.linalg.norm(md) / 3.0 - 1.0) <= 0.05
    # k = 1 is exactly the normalised difference in means (groups play no part)
    V = dim_directions(X_a, rng.integers(0, 3, size=2000), X_b, 1)
    assert V.shape == (d, 1)
    np.testing.assert_allclose(V[:, 0], md / np.linalg.norm(md), rtol=0, atol=1e-15)


def test_dim_directions_and_svd_basis_recover_rank3_subspace():
    rng = np.random.default_rng(1)
    d, G, n = 32, 6, 400
    Q = random_directions(d, 3, seed=5)
    centres = rng.normal(scale=3.0, size=(G, 3)) @ Q.T  # class differences span a random rank-3 subspace
    offset = rng.normal(size=d)  # shared by target and control: not part of any difference
    groups = np.repeat(np.arange(G), n)
    X_t = offset + centres[groups] + 0.3 * rng.normal(size=(G * n, d))
    X_c = offset + 0.3 * rng.normal(size=(2 * n, d))
    V = dim_directions(X_t, groups, X_c, 3)
    np.testing.assert_allclose(V.T @ V, np.eye(3), atol=1e-12)
    cos = principal_cosines(V, Q)
    assert cos.min() >= 0.99, cos
    diffs = np.stack([X_t[groups == g].mean(0) - X_c.mean(0) for g in range(G)])
    S = svd_basis(diffs, 3)
    assert principal_cosines(S, Q).min() >= 0.99
    assert np.all(diffs.mean(0) @ S >= 0)  # sign rule: non-negative dot with the mean row
    # direction 1 is the mean difference; labels of any kind work
    np.testing.assert_allclose(V[:, 0], dim_directions(X_t, groups.astype(str), X_c, 1)[:, 0], atol=1e-15)
    with pytest.raises(MechdiffError, match="there are 6") as e:
        dim_directions(X_t, groups, X_c, 7)
    _one_line(e)


def test_svd_basis_signs_ties_and_rank():
    rows = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, -2.0, 0.0], [0.0, 2.0, 0.0]])  # mean row 0: ties
    V = svd_basis(rows, 2)
    np.testing.assert_allclose(V, [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]], atol=1e-15)  # largest entry positive
    V1 = svd_basis(-np.abs(rows) - 0.1, 1)
    assert float(((-np.abs(rows) - 0.1).mean(0)) @ V1[:, 0]) >= 0
    with pytest.raises(MechdiffError, match=r"rank available \(2\)") as e:
        svd_basis(rows, 3)
    _one_line(e)
    with pytest.raises(MechdiffError, match=r"rank available \(0\)"):
        svd_basis(np.zeros((5, 4)), 1)


def test_sae_directions_top_latents_in_score_order():
    rng = np.random.default_rng(2)
    W = rng.normal(size=(20, 16))
    scores = rng.normal(size=20)
    top = np.argsort(-scores)[:3]
    V = sae_directions(W, scores, 3)
    np.testing.assert_allclose(V.T @ V, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(V[:, 0], W[top[0]] / np.linalg.norm(W[top[0]]), atol=1e-12)
    assert principal_cosines(V, W[top].T).min() > 1 - 1e-12
    assert principal_cosines(V[:, :2], W[top[:2]].T).min() > 1 - 1e-12  # QR keeps score order nested
    with pytest.raises(MechdiffError):
        sae_directions(W, scores[:5], 2)
    W2 = W.copy()
    W2[top[1]] = 2 * W2[top[0]]
    with pytest.raises(MechdiffError, match="linearly dependent"):
        sae_directions(W2, scores, 2)


def test_bad_inputs_raise_one_line_errors():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(10, 8))
    bad = X.copy()
    bad[2, 3] = np.nan
    V = random_directions(8, 2, seed=0)
    site = Site(1, "attn_out")
    for call in (
        lambda: svd_basis(bad, 1),
        lambda: delta_directions(bad, 1),
        lambda: mean_difference(bad, X),
        lambda: dim_directions(X, np.zeros(10), bad, 1),
        lambda: fit_handle(site, V, bad, X),
        lambda: fit_gate(site, bad, X),
        lambda: sae_directions(X, np.r_[np.nan, np.ones(9)], 1),
        # k < 1 (or not an integer)
        lambda: svd_basis(X, 0),
        lambda: delta_directions(X, -1),
        lambda: dim_directions(X, np.zeros(10), X + 1, 0),
        lambda: sae_directions(X, np.ones(10), 1.5),
        lambda: svd_basis(X, True),
        # mismatched widths
        lambda: mean_difference(X, X[:, :5]),
        lambda: dim_directions(X, np.zeros(10), X[:, :5], 1),
        lambda: fit_handle(site, random_directions(6, 2, seed=0), X, X),
        lambda: fit_handle(site, V, X, X[:, :5]),
        lambda: fit_gate(site, X, X[:, :5]),
        lambda: shift(torch.zeros(2, 3, 5), Handle(site, V, np.eye(2), np.zeros(2)), 1.0),
        # other shapes and values
        lambda: fit_handle(site, np.ones((8, 2)), X, X),  # columns not orthonormal
        lambda: Handle(site, V, np.eye(3), np.zeros(2)),
        lambda: dim_directions(X, np.zeros(9), X + 1, 1),
        lambda: dim_directions(X, np.zeros(10), X, 1),  # equal means: no direction
        lambda: intervention([], float("nan")),
    ):
        with pytest.raises(MechdiffError) as e:
            call()
        _one_line(e)


# --------------------------------------------------------------------------------------------- handles, helpers


def test_fit_handle_affine_and_mean_shift_and_json():
    rng = np.random.default_rng(4)
    d, k = 12, 3
    V = random_directions(d, k, seed=1)
    A_true = rng.normal(size=(k, k))
    b_true = rng.normal(size=k)
    X = rng.normal(size=(200, d))
    Y = X + ((X @ V) @ A_true.T + b_true) @ V.T + 0.01 * rng.normal(size=(200, d)) @ (np.eye(d) - V @ V.T)
    h = fit_handle(Site(2, "mlp_out"), V, X, Y)
    np.testing.assert_allclose(h.A, A_true, atol=1e-5)
    np.testing.assert_allclose(h.b, b_true, atol=1e-5)
    h0 = fit_handle(Site(2, "mlp_out"), V, X, Y, affine=False)
    np.testing.assert_array_equal(h0.A, np.zeros((k, k)))
    np.testing.assert_allclose(h0.b, ((Y - X) @ V).mean(0), atol=1e-12)
    back = Handle.from_json(h.to_json())
    assert back.site == h.site
    for a, b in ((back.V, h.V), (back.A, h.A), (back.b, h.b)):
        np.testing.assert_array_equal(a, b)
    # shift: t + alpha V (A V^T t + b) in the tensor's dtype
    t = torch.from_numpy(X[:4])
    want = X[:4] + 0.5 * ((X[:4] @ V) @ h.A.T + h.b) @ V.T
    np.testing.assert_allclose(shift(t, h, 0.5).numpy(), want, rtol=0, atol=1e-12)
    tb = t.to(torch.bfloat16)
    assert shift(tb, h, 0.5).dtype == torch.bfloat16
    # the directional ablation: x - V V^T (x - mean base), every row's subspace coordinates set to the base mean's
    m = mean_ablation_handle(Site(2, "mlp_out"), V, X[:50])
    out = shift(torch.from_numpy(Y[:7]), m, 1.0).numpy()
    np.testing.assert_allclose(out, Y[:7] - (Y[:7] - X[:50].mean(0)) @ V @ V.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out @ V, np.tile(X[:50].mean(0) @ V, (7, 1)), rtol=0, atol=1e-12)
    P_perp = np.eye(d) - V @ V.T
    np.testing.assert_allclose(out @ P_perp, Y[:7] @ P_perp, rtol=0, atol=1e-12)
    with pytest.raises(MechdiffError, match="width"):
        mean_ablation_handle(Site(2, "mlp_out"), V, X[:, :5])


def test_effect_helpers():
    assert gap_closed(1.0, 3.0, 2.5) == pytest.approx(0.75)
    assert gap_closed(3.0, 1.0, 1.5) == pytest.approx(0.75)  # ablation: share of the change removed
    assert np.isnan(gap_closed(1.0, 1.0 + 1e-12, 2.0))
    assert np.isnan(gap_closed(1.0, 2.0, float("nan")))
    ks = [1, 2, 3, 4]
    assert min_k_within(ks, [0.5, 0.95, 0.99, 1.0], [True] * 4, 0.9) == 2
    assert min_k_within(ks, [0.5, 0.95, 0.99, 1.0], [True, False, True, True], 0.9) == 3
    assert min_k_within(ks, [0.5, np.nan, 0.8, 0.85], [True] * 4, 0.9) is None
    with pytest.raises(MechdiffError):
        min_k_within(ks, [1.0], [True], 0.5)
    assert choose_alpha([0.5, 1.0, 2.0, 4.0], [0.2, 0.6, 0.6, 0.9], [True, True, True, False]) == 1.0
    assert choose_alpha([4.0, 2.0, 1.0], [0.9, 0.5, 0.1], [False, False, False]) == 1.0
    assert choose_alpha([1.0, 2.0], [np.nan, 0.3], [True, True]) == 2.0
    # an overshoot counts as far from the goal as the same shortfall: 1.05 beats 0.9 and 1.5, 1.2 ties 0.8
    assert choose_alpha([0.5, 1.0, 2.0], [0.9, 1.05, 1.5], [True, True, True]) == 1.0
    assert choose_alpha([1.0, 2.0, 3.0], [0.8, 1.2, 2.0], [True, True, True]) == 1.0
    assert choose_alpha([1.0, 2.0], [1.0, 1.0], [True, True]) == 1.0


def test_fit_gate_predicts_and_evaluates_in_torch():
    rng = np.random.default_rng(5)
    d = 10
    w = rng.normal(size=d)
    X_pos = rng.normal(size=(200, d)) * 3 + 3.0 * w
    X_neg = rng.normal(size=(200, d)) * 3 - 3.0 * w
    g = fit_gate(Site(0, "resid_post"), X_pos, X_neg, seed=0)
    assert g.train_accuracy >= 0.95
    X = np.vstack([X_pos, X_neg])
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(X)
    clf = LogisticRegression(random_state=0, max_iter=2000).fit(sc.transform(X), np.r_[np.ones(200), np.zeros(200)])
    np.testing.assert_array_equal(g.predict(X), clf.predict(sc.transform(X)) == 1)
    np.testing.assert_array_equal(g.accepts(torch.from_numpy(X)).numpy(), g.predict(X))
    np.testing.assert_array_equal(Gate.from_json(g.to_json()).predict(X), g.predict(X))


def test_collect_decision_acts_in_rows_order(world):
    tok, model, enc = world
    rows = np.array([7, 3, 120, 3, 45])  # unsorted, with a repeat
    sites = [Site(1, "attn_out"), Site(2, "resid_post")]
    got = collect_decision_acts(model, enc, rows, sites, batch_size=2)
    assert set(got) == {"L1.attn_out", "L2.resid_post"}
    for j, r in enumerate(rows):
        ids = torch.tensor([enc.ids[r]])
        acts, _ = capture(model, ids, torch.ones_like(ids), sites)
        for s in sites:
            np.testing.assert_allclose(got[s.name][j], acts[s.name][0, enc.decision[r]].double().numpy(),
                                       atol=1e-5)
    with pytest.raises(MechdiffError):
        collect_decision_acts(model, enc, [0, N_PROMPTS], sites)
    # enough prompts for the shared opening to run once: the same activations as one unpadded forward each
    many = np.arange(0, 120, 3)
    assert enc.shared_prefix >= 2
    seen = []
    h = model.model.layers[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[1]))
    try:
        got = collect_decision_acts(model, enc, many, sites, batch_size=4)
    finally:
        h.remove()
    assert seen[0] == enc.shared_prefix  # the opening ran on its own first
    for j, r in enumerate(many):
        ids = torch.tensor([enc.ids[r]])
        acts, _ = capture(model, ids, torch.ones_like(ids), sites)
        for s in sites:
            np.testing.assert_allclose(got[s.name][j], acts[s.name][0, enc.decision[r]].double().numpy(),
                                       atol=1e-5)


# --------------------------------------------------------------------------------------------- protocol


@contextlib.contextmanager
def _spy(model, site, store):
    with read_at(model, site, lambda t: store.append(t.clone())):
        yield


def _generate(model, tok, ids, mask, inter, start, sites):
    """Two greedy tokens (a prefill call and one decode step) with spies before and after the intervention."""
    pre, post = {s: [] for s in sites}, {s: [] for s in sites}
    with contextlib.ExitStack() as stack:
        for s in sites:
            stack.enter_context(_spy(model, s, pre[s]))  # registered first: sees the unmodified activation
        stack.enter_context(inter(model, start))
        for s in sites:
            stack.enter_context(_spy(model, s, post[s]))
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    return pre, post


def _equal_length_batch(enc, n=6):
    """A batch of prompts of one length (no padding: generation appends after the last real token)."""
    lengths = enc.lengths
    L = np.bincount(lengths).argmax()
    rows = np.flatnonzero(lengths == L)[:n]
    r, ids, mask, pos = next(batches(enc, rows, len(rows), enc.pad, sort_by_length=False))
    return ids, mask, pos


def _expected(t: torch.Tensor, h: Handle, alpha: float) -> np.ndarray:
    x = t.double().numpy()
    return x + alpha * ((x @ h.V) @ h.A.T + h.b) @ h.V.T


def test_intervention_shifts_from_start_and_every_decode_position(world):
    tok, model, enc = world
    rng = np.random.default_rng(6)
    site = Site(1, "resid_post")
    h = Handle(site, random_directions(D, 3, seed=2), rng.normal(size=(3, 3)), rng.normal(size=3))
    alpha = 0.7
    ids, mask, pos = _equal_length_batch(enc)
    start = torch.clamp(pos - torch.arange(len(pos)) % 3, min=1)  # rows start at different positions
    pre, post = _generate(model, tok, ids, mask, intervention([h], alpha), start, [site])
    assert [t.shape[1] for t in pre[site]] == [ids.shape[1], 1]  # one prefill call, one decode step
    p0, q0 = pre[site][0], post[site][0]
    for b in range(len(start)):
        s = int(start[b])
        assert torch.equal(q0[b, :s], p0[b, :s])  # before start: untouched, bit for bit
        np.testing.assert_allclose(q0[b, s:].double().numpy(), _expected(p0[b, s:], h, alpha), atol=1e-5)
    # the decode step (T == 1) is shifted at its one position in every row
    np.testing.assert_allclose(post[site][1].double().numpy(), _expected(pre[site][1], h, alpha), atol=1e-5)
    assert (post[site][1] - pre[site][1]).abs().amax(dim=(1, 2)).min() > 1e-3
    # outside the context nothing is modified
    a0, _ = capture(model, ids, mask, [site])
    torch.testing.assert_close(a0[site.name], p0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("gate_site", [Site(0, "resid_post"), Site(1, "resid_post")])
def test_gate_rejected_rows_stay_untouched(world, gate_site):
    tok, model, enc = world
    site = Site(1, "resid_post")
    ids, mask, pos = _equal_length_batch(enc)
    # the gate's input at each row's start, before any modification
    acts, _ = capture(model, ids, mask, [gate_site])
    x = acts[gate_site.name][torch.arange(len(pos)), pos].double().numpy()
    w = np.random.default_rng(7).normal(size=D)
    score = x @ w
    gate = Gate(gate_site, np.zeros(D), np.ones(D), w, -float(np.median(score)))
    keep = gate.predict(x)
    assert 0 < keep.sum() < len(keep)
    # the handle pushes every row far along the gate's own weights: a gate that read after it would accept all
    u = (w / np.linalg.norm(w))[:, None]
    h = Handle(site, u, np.zeros((1, 1)), np.array([100.0]))
    pre, post = _generate(model, tok, ids, mask, intervention([h], 1.0, gate=gate), pos, [site])
    for call in (0, 1):  # prefill, decode step
        p, q = pre[site][call], post[site][call]
        for b in range(len(pos)):
            s = int(pos[b]) if call == 0 else 0
            if keep[b]:
                assert torch.equal(q[b, :s], p[b, :s])
                np.testing.assert_allclose(q[b, s:].double().numpy(), _expected(p[b, s:], h, 1.0), atol=1e-4)
            else:
                assert torch.equal(q[b], p[b])
    # a decode step without its prefill has no gate decision
    with intervention([h], 1.0, gate=gate)(model, pos), torch.no_grad(), pytest.raises(MechdiffError) as e:
        model(input_ids=ids[:, :1])
    _one_line(e)


def test_gate_must_read_at_or_before_the_first_handle():
    g = Gate(Site(2, "resid_post"), np.zeros(4), np.ones(4), np.ones(4), 0.0)
    h = Handle(Site(1, "resid_post"), np.eye(4)[:, :1], np.zeros((1, 1)), np.zeros(1))
    with pytest.raises(MechdiffError, match="comes after") as e:
        intervention([h], 1.0, gate=g)
    _one_line(e)
    # forward order inside a block: resid_pre < attn_out < mlp_out < resid_post
    later = Handle(Site(3, "attn_out"), np.eye(4)[:, :1], np.zeros((1, 1)), np.zeros(1))
    with pytest.raises(MechdiffError):
        intervention([later, Handle(Site(2, "mlp_out"), h.V, h.A, h.b)], 1.0, gate=g)
    intervention([later], 1.0, gate=g)
    intervention([Handle(Site(2, "resid_post"), h.V, h.A, h.b)], 1.0, gate=g)  # same site: allowed
    intervention([Handle(Site(3, "resid_pre"), h.V, h.A, h.b)], 1.0, gate=g)


# --------------------------------------------------------------------------------------------- known answer


def _decision_logits(model, enc, rows, inter=None, whole_prompt=False):
    out = np.zeros((len(rows), model.config.vocab_size))
    for r, ids, mask, pos in batches(enc, rows, 64, enc.pad):
        start = torch.zeros_like(pos) if whole_prompt else pos
        ctx = inter(model, start) if inter is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            lg = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(r)), pos]
        out[np.searchsorted(rows, r)] = lg.double().numpy()
    return out


@pytest.mark.parametrize("layer,whole_prompt", [(3, False), (2, True)])
def test_planted_edit_known_answer(world, layer, whole_prompt):
    """Planted out' = out (I + s U U^T): directions, A = sI / -s/(1+s) I, KL closed, min k = r.

    At the last block (layer 3) the decision token's logits depend on the edit only through the decision
    position, so the intervention starts there; at layer 2 later attention also reads the edited earlier
    positions, so the intervention covers the whole prompt (start 0).
    """
    tok, base, enc = world
    tuned = copy.deepcopy(base)
    info = plant_edit(tuned, layer=layer, kind="attn_out", rank=R, scale=SCALE, seed=1)
    site = Site(layer, "attn_out")
    tr, va = np.arange(N_TRAIN), np.arange(N_TRAIN, N_PROMPTS)
    Xb = collect_decision_acts(base, enc, np.arange(N_PROMPTS), [site])[site.name]
    Xt = collect_decision_acts(tuned, enc, np.arange(N_PROMPTS), [site])[site.name]
    delta = Xt[tr] - Xb[tr]
    # directions: paired changes and the transport map's change basis find U
    assert principal_cosines(delta_directions(delta, R), info.directions).min() >= 0.99
    assert principal_cosines(transport_directions(fit_map(Xb[tr], Xt[tr]), R), info.directions).min() >= 0.99
    # with V = U the fitted handles are the planted edit and its inverse
    steer_U = fit_handle(site, info.directions, Xb[tr], Xt[tr])
    abl_U = fit_handle(site, info.directions, Xt[tr], Xb[tr])
    np.testing.assert_allclose(steer_U.A, SCALE * np.eye(R), atol=1e-4)
    np.testing.assert_allclose(abl_U.A, -SCALE / (1 + SCALE) * np.eye(R), atol=1e-5)
    np.testing.assert_allclose(steer_U.b, 0.0, atol=1e-4)
    np.testing.assert_allclose(abl_U.b, 0.0, atol=1e-4)
    # KL at the decision token on held-out prompts
    lb, lt = _decision_logits(base, enc, va), _decision_logits(tuned, enc, va)
    kl_bt, kl_tb = kl_divergence(lb, lt).mean(), kl_divergence(lt, lb).mean()
    assert kl_bt > 0.03 and kl_tb > 0.03
    ks = list(range(1, R + 3))
    steer_eff, abl_eff = [], []
    for k in ks:
        V = delta_directions(delta, k)
        st, ab = fit_handle(site, V, Xb[tr], Xt[tr]), fit_handle(site, V, Xt[tr], Xb[tr])
        ls = _decision_logits(base, enc, va, intervention([st], 1.0), whole_prompt)
        la = _decision_logits(tuned, enc, va, intervention([ab], 1.0), whole_prompt)
        steer_eff.append(gap_closed(kl_tb, 0.0, kl_divergence(lt, ls).mean()))  # 1 - KL(t||steered)/KL(t||b)
        abl_eff.append(gap_closed(kl_bt, 0.0, kl_divergence(lb, la).mean()))  # 1 - KL(b||ablated)/KL(b||t)
    assert abl_eff[R - 1] >= 0.95, abl_eff
    assert steer_eff[R - 1] >= 0.90, steer_eff
    budget = [True] * len(ks)
    assert min_k_within(ks, abl_eff, budget, 0.9) == R, abl_eff
    assert min_k_within(ks, steer_eff, budget, 0.9) == R, steer_eff
    # alpha 0 is no intervention at all
    l0 = _decision_logits(base, enc, va, intervention([st], 0.0), whole_prompt)
    np.testing.assert_array_equal(l0, lb)
