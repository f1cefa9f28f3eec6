"""Hierarchical SAE: recovery of a planted tree, routing, the shared training loop (resume), save/load and the
concept metrics against hand numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechdiff.errors import MechdiffError
from mechdiff.sae.hsae import (
    HierarchicalSAE,
    atom_recovery,
    load_hsae,
    match_parents,
    purity_leakage,
    teacher_targets,
)
from mechdiff.sae.train import SAEConfig, train_sae

P, C, D = 8, 4, 64


def planted_tree(n: int = 30000, seed: int = 0, noise: float = 0.05, max_parents: int = 2):
    """Rows = sum over 1..max_parents active parents of a u_parent + b v_child (one child each) + noise."""
    rng = np.random.default_rng(seed)
    atoms = np.linalg.qr(rng.normal(size=(D, P + P * C)))[0].T
    up, vc = atoms[:P], atoms[P:].reshape(P, C, D)
    X = noise * rng.normal(size=(n, D))
    par = np.zeros(n, dtype=np.int64)
    ch = np.zeros(n, dtype=np.int64)
    npar = rng.integers(1, max_parents + 1, size=n)
    for i in range(n):
        for j, p in enumerate(rng.choice(P, size=npar[i], replace=False)):
            c = rng.integers(C)
            X[i] += rng.uniform(1, 2) * up[p] + rng.uniform(0.5, 1.5) * vc[p, c]
            if j == 0:
                par[i], ch[i] = p, c
    return X.astype(np.float32), up, vc, par, ch, npar


def batches(X: np.ndarray, epochs: int, seed: int = 0, bs: int = 256):
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for s in range(0, len(X), bs):
            yield X[order[s : s + bs]]


def train(m: HierarchicalSAE, X: np.ndarray, epochs: int, out=None, **kw) -> HierarchicalSAE:
    cfg = SAEConfig(d_in=D, width=m.width, k=m.k, batch_size=256, lr=2e-3, seed=0, ckpt_every=kw.pop("ckpt", 500),
                    ckpt_seconds=0)
    return train_sae(batches(X, epochs), cfg, out, total_tokens=len(X) * epochs, progress=False, model=m, **kw)


@pytest.fixture(scope="module")
def tree():
    return planted_tree()


def teacher_from_labels(X, par, ch, npar):
    """Class means as the teacher (as the geometry stage's concept vectors are), child deltas from them."""
    one = npar == 1
    pm = np.stack([X[one & (par == p)].mean(0) for p in range(P)])
    cm = [np.stack([X[one & (par == p) & (ch == c)].mean(0) - pm[p] for c in range(C)]) for p in range(P)]
    return pm, cm


def test_teacher_initialised_hsae_recovers_a_planted_tree(tree):
    X, up, vc, par, ch, npar = tree
    m = HierarchicalSAE(D, P, C, 2, seed=0, ortho_coef=1.0, freeze_steps=200)
    m.init_teacher(*teacher_from_labels(X, par, ch, npar))
    assert atom_recovery(m.dec_c.detach().reshape(-1, D).numpy(), vc.reshape(-1, D)) < 0.5  # not there at init
    m = train(m, X, 6)
    assert atom_recovery(m.dec_p.detach().numpy(), up) >= 0.9
    assert atom_recovery(m.dec_c.detach().reshape(-1, D).numpy(), vc.reshape(-1, D)) >= 0.9
    one = npar == 1
    tp, tc = m.route(X[one])
    assert np.mean(tp == par[one]) >= 0.95
    assert np.mean(tc == ch[one]) >= 0.95
    # children fire only with their parent: every active child code sits under an active parent
    z = m.encode(torch.from_numpy(X[:2000])).detach().numpy()
    kids = z[:, P:].reshape(-1, P, C)
    assert np.all((kids > 0).any(2) <= (z[:, :P] > 0))
    assert ((kids > 0).sum(2) <= 1).all()


def test_random_initialisation_does_worse_on_the_same_tree(tree):
    X, up, vc, par, ch, npar = tree
    m = train(HierarchicalSAE(D, P, C, 2, seed=0, ortho_coef=1.0), X, 6)
    rec = atom_recovery(m.dec_p.detach().numpy(), up)
    assert rec < 0.9  # parents merge: the local optimum the teacher avoids


def test_stage_a_freezes_the_teacher_parents_for_exactly_freeze_steps(tree):
    X, *_ = tree
    parents = np.linalg.qr(np.random.default_rng(0).normal(size=(D, 3)))[0].T
    seen = []

    class Watch(HierarchicalSAE):
        def normalize_decoder_(self) -> None:  # called once per step, after the optimizer step
            super().normalize_decoder_()
            seen.append(self.dec_p[:3].detach().clone().numpy())

    m = Watch(D, P, C, 2, seed=1, ortho_coef=1.0, freeze_steps=5)
    m.init_teacher(parents, [np.zeros((0, D))] * 3)
    m = train(m, X[:5000], 1)
    for step in range(5):  # steps 1..5 leave the teacher parents where they were
        np.testing.assert_allclose(seen[step], parents, atol=1e-6)
    assert np.abs(seen[5] - parents).max() > 1e-5  # step 6 moves them
    assert not np.allclose(m.dec_p[3:].detach().numpy(), HierarchicalSAE(D, P, C, 2, seed=1).dec_p[3:].detach())


def test_init_teacher_orthogonalises_children_under_the_metric():
    rng = np.random.default_rng(0)
    L = rng.normal(size=(D, D))
    M = L @ L.T / D + np.eye(D)
    m = HierarchicalSAE(D, 4, 3, 1, metric=M)
    par = rng.normal(size=(2, D))
    kids = [rng.normal(size=(3, D)), rng.normal(size=(2, D))]
    m.init_teacher(par, kids)
    dp, dc = m.dec_p.detach().double().numpy(), m.dec_c.detach().double().numpy()
    for p, k in enumerate(kids):
        for j in range(len(k)):
            assert abs(dp[p] @ M @ dc[p, j]) < 1e-5
    assert m._ortho().item() < 0.3  # untouched random children keep a non-zero penalty
    with pytest.raises(MechdiffError, match="raise hsae.width"):
        m.init_teacher(rng.normal(size=(5, D)), [])
    with pytest.raises(MechdiffError, match="raise hsae.children"):
        m.init_teacher(par[:1], [rng.normal(size=(4, D))])


def test_training_resumes_from_a_checkpoint_exactly(tree, tmp_path):
    X, *_ = tree
    X = X[:6000]
    full = train(HierarchicalSAE(D, P, C, 2, seed=0, ortho_coef=1.0), X, 2)
    out = tmp_path / "h"

    class Stop(Exception):
        pass

    def stop_at(rec):
        if rec["step"] >= 40:
            raise Stop

    with pytest.raises(Stop):
        train(HierarchicalSAE(D, P, C, 2, seed=0, ortho_coef=1.0), X, 2, out, ckpt=20, log_every=10, on_log=stop_at)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 20  # stopped before 40's
    resumed = train(HierarchicalSAE(D, P, C, 2, seed=0, ortho_coef=1.0), X, 2, out, resume=True)
    # the first run's log (every 10 steps) came back with the checkpoint: a fresh start would log from step 50
    assert [r["step"] for r in resumed.train_log[:2]] == [10, 20]
    assert int(resumed.step) == full.train_log[-1]["step"]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    loaded = load_hsae(out)
    torch.testing.assert_close(loaded(torch.from_numpy(X[:50])), resumed(torch.from_numpy(X[:50])))


def test_encode_decode_agree_with_forward(tree):
    X, *_ = tree
    m = HierarchicalSAE(D, P, C, 3, seed=2)
    m.set_input_scale(torch.from_numpy(X[:256]))
    x = torch.from_numpy(X[:100])
    z = m.encode(x)
    assert z.shape == (100, P * (1 + C)) and ((z[:, :P] > 0).sum(1) <= 3).all()
    torch.testing.assert_close(m.decode(z), m(x))


def test_purity_leakage_and_matching_against_hand_numbers():
    labels = np.array([0, 0, 1, 1, 2, 2])
    codes = np.array([[0, 2.0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 0], [0, 1.0, 3.0], [0, 0, 1.0]])
    match = match_parents(codes, labels, 3)
    np.testing.assert_array_equal(match, [1, 0, 2])
    rows = {r["concept"]: r for r in purity_leakage(codes, labels, match)}
    assert rows[0]["purity"] == pytest.approx(1.5 / (1.5 + 0.25))  # mean 1.5 inside, 1/4 outside
    assert rows[0]["leakage"] == pytest.approx(0.25) and rows[0]["recall"] == 1.0
    assert rows[2]["purity"] == pytest.approx(1.0) and rows[2]["leakage"] == 0.0
    assert rows[1]["recall"] == 0.5


def test_teacher_targets_arithmetic():
    r = {"purity": 0.6, "leakage": 0.5, "steering_leakage": 0.4, "fvu": 0.1}
    t = {"purity": 0.75, "leakage": 0.3, "steering_leakage": 0.35, "fvu": 0.105}
    out = teacher_targets(r, t)
    assert out["purity_gain_pp"] == pytest.approx(15.0)
    assert out["leakage_reduction"] == pytest.approx(0.4)
    assert out["steering_leakage_reduction"] == pytest.approx(0.125)
    assert out["met"] == {"purity": True, "leakage": True, "steering_leakage": False, "reconstruction_parity": True}


def test_context_teacher_is_class_means_and_deltas(tree):
    from mechdiff.sae.hsae import context_teacher

    X, up, vc, par, ch, npar = tree
    one = np.flatnonzero(npar == 1)[:4000]
    owner = [f"p{par[i]}c{ch[i]}w{i % 3}" for i in one]  # three "words" per child
    kids = [[[f"p{p}c{c}w{j}" for j in range(3)] for c in range(C)] for p in range(P)]
    words = [[w for ws in kids[p] for w in ws] for p in range(P)]
    tp, tk = context_teacher(X[one], owner, [f"p{p}" for p in range(P)], kids, words, method="mean")
    centre = X[one].mean(0)
    for p in range(P):
        mean_p = X[one][par[one] == p].mean(0)
        np.testing.assert_allclose(tp[p], mean_p - centre, rtol=1e-5, atol=1e-5)
        for c in range(C):
            sel = (par[one] == p) & (ch[one] == c)
            np.testing.assert_allclose(tk[p][c], X[one][sel].mean(0) - mean_p, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.abs(tp @ up.T).argmax(1), np.arange(P))  # each points at its own parent
    with pytest.raises(MechdiffError, match="no context rows for concept parent 'x'"):
        context_teacher(X[one], owner, ["p0", "x"], [kids[0], []], [words[0], ["nope"]])
    with pytest.raises(MechdiffError, match="at least two concept parents"):
        context_teacher(X[one], owner, ["p0"], [kids[0]], [words[0]])


def test_hsae_gradients_are_reproducible():
    """The decoder gradients (index_select / index_add) are the same bit for bit on every backward: an
    advanced-index gather's accumulate made them, and the H-SAE stage's metrics, vary run to run."""
    from mechdiff.sae.hsae import HierarchicalSAE

    x = torch.randn(512, 48, generator=torch.Generator().manual_seed(0))
    grads = []
    for _ in range(3):
        m = HierarchicalSAE(48, 64, 4, 8, seed=3, ortho_coef=1.0, metric=torch.eye(48))
        loss, _ = m.training_loss(x)
        loss.backward()
        grads.append([p.grad.clone() for p in (m.dec_p, m.dec_c)])
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], g))
