"""TopK SAE / crosscoder: planted dictionaries, sparse = dense gradients, AuxK, resampling, resume, format, evaluation."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from mechdiff.errors import MechdiffError
from mechdiff.sae import SAEConfig, TopKSAE, eval_sae, load_sae, save_sae, spliced_metrics, train_sae
from mechdiff.sae.evaluate import Criteria, check_sae


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread avoids OpenMP overhead on a shared machine; results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dictionary(n_atoms: int, d: int, seed: int) -> np.ndarray:
    A = np.random.default_rng(seed).standard_normal((n_atoms, d))
    return A / np.linalg.norm(A, axis=1, keepdims=True)


def _codes(n: int, n_atoms: int, k: int, rng: np.random.Generator) -> np.ndarray:
    Z = np.zeros((n, n_atoms))
    idx = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :k]
    np.put_along_axis(Z, idx, rng.uniform(0.5, 1.5, (n, k)), axis=1)
    return Z


def _stream(X: np.ndarray, bs: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(len(X))
        for s in range(0, len(X) - bs + 1, bs):
            yield X[p[s : s + bs]].astype(np.float32)


def _max_cos(atoms: np.ndarray, W_dec: np.ndarray) -> np.ndarray:
    """For each atom, the max cosine to any decoder column (W_dec (d, width))."""
    Wn = W_dec / np.maximum(np.linalg.norm(W_dec, axis=0, keepdims=True), 1e-12)
    return (atoms @ Wn).max(1)


@pytest.mark.parametrize("bf16", [False, True])
def test_recovers_planted_dictionary(bf16, monkeypatch):
    """Also with the top-k selection in bf16 (`SAEConfig.bf16`, params sae.select_dtype): the selection matmul
    runs in bf16 (spied), the planted atoms are recovered as well."""
    d, n_atoms, k = 32, 128, 5
    A = _dictionary(n_atoms, d, 0)
    rng = np.random.default_rng(1)
    X = _codes(30000, n_atoms, k, rng) @ A + 0.01 * rng.standard_normal((30000, d))
    seen: set[torch.dtype] = set()
    select = TopKSAE._select

    def spy(self, src):
        seen.add(src.dtype)
        return select(self, src)

    monkeypatch.setattr(TopKSAE, "_select", spy)
    cfg = SAEConfig(d_in=d, width=256, k=k, batch_size=256, lr=3e-3, seed=0, bf16=bf16)
    sae = train_sae(_stream(X, 256, 0), cfg, None, total_tokens=1200 * 256, progress=False)
    assert seen == {torch.bfloat16 if bf16 else torch.float32}
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    mc = _max_cos(A, sae.W_dec.detach().numpy())
    assert (mc >= 0.9).mean() >= 0.9, np.sort(mc)[:10]
    Xt = _codes(2000, n_atoms, k, rng) @ A
    ev = eval_sae(sae, Xt)
    assert ev["fvu"] < 0.2 and ev["l0"] <= k
    # seed 000's validation: the trained SAE passes; an untrained one with k = width / 2 fails reconstruction
    # and sparsity (width / L0, against numpy's count of the latents it fires)
    crit = Criteria(max_fvu=0.2, min_sparsity=10.0, max_dead_pct=50.0, min_kl_recovered=0.9)
    assert check_sae(ev, 256, crit) == {"sparsity_ratio": pytest.approx(256 / ev["l0"]), "passed": True, "failed": ""}
    bad = TopKSAE(d, 256, 128)
    ev_bad = eval_sae(bad, Xt)
    l0_ref = (bad.encode(torch.as_tensor(Xt, dtype=torch.float32)).detach().numpy() > 0).sum(1).mean()
    got = check_sae(ev_bad, 256, crit)
    assert got["sparsity_ratio"] == pytest.approx(256 / l0_ref) and got["sparsity_ratio"] < 10
    assert got["passed"] is False and got["failed"] == "fvu,sparsity"


def test_check_sae_thresholds_nan_and_spliced_kl():
    crit = Criteria(max_fvu=0.1, min_sparsity=10.0, max_dead_pct=20.0, min_kl_recovered=0.9)
    good = {"fvu": 0.05, "l0": 8.0, "dead_pct": 5.0}
    assert check_sae(good, 128, crit)["passed"]  # no spliced metrics: no KL check
    assert check_sae({**good, "kl_recovered_base": 0.95, "kl_recovered_tuned": 0.85}, 128, crit)["failed"] == \
        "kl_recovered"  # every model it is spliced into must recover
    assert check_sae({**good, "fvu": float("nan"), "dead_pct": 30.0}, 128, crit)["failed"] == "fvu,dead"
    assert check_sae({**good, "l0": 0.0}, 128, crit) == {"sparsity_ratio": None, "passed": True, "failed": ""}
    assert check_sae({**good, "l0": float("nan")}, 128, crit)["failed"] == "sparsity"
    assert check_sae({**good, "fvu": 0.1, "l0": 12.8}, 128, crit)["passed"]  # thresholds are inclusive


def test_crosscoder_and_delta_find_tuned_only_atoms():
    d, n_shared, n_new = 16, 32, 8
    S = _dictionary(n_shared, d, 2)
    Nw = _dictionary(n_new, d, 3)
    rng = np.random.default_rng(4)
    n = 20000
    base = _codes(n, n_shared, 3, rng) @ S
    new = _codes(n, n_new, 1, rng) @ Nw * (rng.random((n, 1)) < 0.5)
    tuned = base + new
    # crosscoder on [base, tuned]
    cfg = SAEConfig(d_in=d, width=96, k=4, batch_size=256, lr=3e-3, n_blocks=2, seed=0)
    cc = train_sae(_stream(np.c_[base, tuned], 256, 0), cfg, None, total_tokens=1600 * 256, progress=False)
    Wd = cc.W_dec.detach().numpy()  # (2d, width)
    rel = cc.relative_norms(block=1).numpy()
    norms = cc.decoder_norms().numpy()
    np.testing.assert_allclose(norms[1] / (norms[0] + norms[1]), rel, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt((norms ** 2).sum(0)), 1.0, atol=1e-5)  # joint unit norm
    new_joint = np.c_[np.zeros_like(Nw), Nw]
    shared_joint = np.c_[S, S] / np.sqrt(2)
    Wn = Wd / np.linalg.norm(Wd, axis=0, keepdims=True)
    new_best = (new_joint @ Wn).argmax(1)
    assert ((new_joint @ Wn).max(1) >= 0.9).all()
    assert (rel[new_best] > 0.9).all(), rel[new_best]
    sh_cos = shared_joint @ Wn
    sh_best = sh_cos.argmax(1)
    ok = sh_cos.max(1) >= 0.9
    assert ok.mean() >= 0.9
    assert np.all(np.abs(rel[sh_best[ok]] - 0.5) < 0.1), rel[sh_best[ok]]
    # delta SAE on tuned - base finds the new atoms
    dcfg = SAEConfig(d_in=d, width=32, k=1, batch_size=256, lr=3e-3, seed=0)
    delta = tuned - base
    delta = delta[np.abs(delta).sum(1) > 0]
    ds = train_sae(_stream(delta, 256, 1), dcfg, None, total_tokens=300 * 256, progress=False)
    assert (_max_cos(Nw, ds.W_dec.detach().numpy()) >= 0.9).all()


@pytest.mark.parametrize("aux_fill,dead_every", [(0, 4), (4, 4), (4, 16), (3, 2)])
@pytest.mark.parametrize("batchtopk,n_blocks", [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_sparse_gradients_equal_dense(batchtopk, n_blocks, aux_fill, dead_every, monkeypatch):
    """Both AuxK forms match the autograd reference: pairs (fill 0, or 24 dead > 3 x k_aux), dense over the dead
    columns with a top-k_aux mask (12 dead) and without one (3 dead <= k_aux: every dead column selected)."""
    import mechdiff.sae.model as sae_model

    monkeypatch.setattr(sae_model, "AUX_DENSE_FILL", aux_fill)
    sae = TopKSAE(12, 48, 4, k_aux=6, batchtopk=batchtopk, n_blocks=n_blocks, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.b_enc.normal_(generator=g)
        sae.b_pre.normal_(generator=g)
    x = torch.randn(40, 12 * n_blocks, generator=g)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::dead_every] = True
    grads, losses = [], []
    for sparse in (True, False):
        sae.zero_grad()
        loss, _ = sae.training_loss(x, dead, sparse=sparse)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name
    # the loss is what the formulas say: batch FVU + aux / 32
    with torch.no_grad():
        pre = sae.pre_acts(x)
        if batchtopk:
            flat = pre.flatten()
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[flat.topk(4 * 40).indices] = True
            z = torch.where(keep.view_as(pre), pre.relu(), torch.zeros_like(pre))
        else:
            v, i = pre.topk(4, dim=1)
            z = torch.zeros_like(pre).scatter(1, i, v.relu())
        xh = z @ sae.dec + sae.b_pre
        main = ((xh - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        e = x - xh
        pd = pre.clone()
        pd[:, ~dead] = -torch.inf
        va, ia = pd.topk(min(6, int(dead.sum())), dim=1)
        eh = torch.zeros_like(pre).scatter(1, ia, va.relu()) @ sae.dec
        aux = ((eh - e) ** 2).sum() / (e ** 2).sum()
    assert losses[0] == pytest.approx(float(main + aux / 32), rel=1e-5)


@pytest.mark.parametrize("aux_fill", [0, 4])
@pytest.mark.parametrize("batchtopk", [False, True])
def test_sparse_kernels_with_bf16_selection_and_input_grad_match_dense(batchtopk, aux_fill, monkeypatch):
    """bf16 selection (values recomputed in fp32 by sampled dot products) and d loss / d x: sparse == dense,
    with AuxK as pairs (fill 0) or dense over the 13 dead columns."""
    import mechdiff.sae.model as sae_model

    monkeypatch.setattr(sae_model, "AUX_DENSE_FILL", aux_fill)
    sae = TopKSAE(10, 40, 3, k_aux=5, batchtopk=batchtopk, seed=5)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_enc.normal_(generator=g)
        sae.b_pre.normal_(generator=g)
    x0 = torch.randn(33, 10, generator=g)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[1::3] = True
    res = []
    for sparse in (True, False):
        sae.zero_grad()
        x = x0.clone().requires_grad_(True)
        loss, info = sae.training_loss(x, dead, sparse=sparse, select_dtype=torch.bfloat16)
        loss.backward()
        res.append((float(loss.detach()), x.grad.clone(), {n: p.grad.clone() for n, p in sae.named_parameters()},
                    info["fired"].clone()))
    assert res[0][0] == pytest.approx(res[1][0], rel=1e-5)
    assert torch.allclose(res[0][1], res[1][1], rtol=1e-4, atol=1e-6)
    assert torch.equal(res[0][3], res[1][3])
    for name in res[0][2]:
        assert torch.allclose(res[0][2][name], res[1][2][name], rtol=1e-4, atol=1e-6), name
    # central differences (float64 copy) confirm the sparse input gradient of L_main (L_aux uses a detached e)
    sae64 = TopKSAE(10, 40, 3, k_aux=5, batchtopk=batchtopk, seed=5).double()
    sae64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in sae.state_dict().items()})
    x = x0.double().clone().requires_grad_(True)
    loss, _ = sae64.training_loss(x, dead, aux_coef=0.0)
    loss.backward()
    h = 1e-6
    for i, j in ((4, 7), (0, 0), (32, 9)):
        with torch.no_grad():
            xp, xm = x0.double().clone(), x0.double().clone()
            xp[i, j] += h
            xm[i, j] -= h
            fd = (float(sae64.training_loss(xp, dead, aux_coef=0.0)[0])
                  - float(sae64.training_loss(xm, dead, aux_coef=0.0)[0])) / (2 * h)
        assert float(x.grad[i, j]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_scratch_buffers_do_not_leak_between_batches():
    """Reused selection buffers: a big batch then a small one gives what a fresh model gives."""
    g = torch.Generator().manual_seed(3)
    big, small = torch.randn(50, 6, generator=g), torch.randn(7, 6, generator=g)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[::2] = True
    a, b = TopKSAE(6, 24, 2, seed=1), TopKSAE(6, 24, 2, seed=1)
    a.training_loss(big, dead)
    la, ia = a.training_loss(small, dead)
    lb, ib = b.training_loss(small, dead)
    assert float(la.detach()) == float(lb.detach()) and ia["aux"] == ib["aux"] and torch.equal(ia["fired"], ib["fired"])
    a.release_workspace()
    assert float(a.training_loss(small, dead)[0].detach()) == float(lb.detach())


def test_decoder_grad_projection_matches_numpy():
    sae = TopKSAE(5, 9, 2, seed=2)
    G = np.random.default_rng(0).standard_normal((9, 5))
    sae.dec.grad = torch.from_numpy(G).float()
    D = sae.dec.detach().double().numpy()
    sae.project_decoder_grad_()
    want = G - (G * D).sum(1, keepdims=True) * D
    np.testing.assert_allclose(sae.dec.grad.double().numpy(), want, atol=1e-6)
    np.testing.assert_allclose((sae.dec.grad.double().numpy() * D).sum(1), 0.0, atol=1e-6)


def test_auxk_gives_dead_latents_gradient():
    sae = TopKSAE(8, 64, 2, k_aux=4, seed=0)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chosen = torch.unique(sae.pre_acts(x).topk(2, dim=1).indices)
    dead = torch.ones(64, dtype=torch.bool)
    dead[chosen] = False  # latents that fire on no row of this batch
    assert int(dead.sum()) >= 16
    for coef, expect in ((1 / 32, True), (0.0, False)):
        sae.zero_grad()
        loss, _ = sae.training_loss(x, dead, aux_coef=coef)
        loss.backward()
        for g in (sae.W_enc.grad, sae.dec.grad):
            assert bool((g[dead].abs().sum(1) > 0).any()) == expect
            assert bool((g[~dead].abs().sum(1) > 0).all())


def test_resample_rewrites_weights_in_place():
    sae = TopKSAE(8, 32, 2, seed=0)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 9]] = True
    ptrs = (sae.dec.data_ptr(), sae.W_enc.data_ptr())
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    with torch.no_grad():
        sae.b_enc[dead] = 1.0
    idx = sae.resample_dead_(x, dead, generator=torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == [1, 5, 9]
    assert (sae.dec.data_ptr(), sae.W_enc.data_ptr()) == ptrs
    assert not torch.allclose(sae.dec[dead], before["dec"][dead])
    assert not torch.allclose(sae.W_enc[dead], before["W_enc"][dead])
    assert torch.equal(sae.dec[~dead], before["dec"][~dead])
    assert torch.equal(sae.b_enc[dead], torch.zeros(3))
    np.testing.assert_allclose(sae.dec.detach().norm(dim=1).numpy(), 1.0, atol=1e-5)


def _crashing(it, n):
    for i, b in enumerate(it):
        if i == n:
            raise RuntimeError("simulated crash")
        yield b


@pytest.mark.parametrize("batchtopk", [False, True])
def test_resume_matches_uninterrupted(tmp_path, batchtopk):
    X = np.random.default_rng(0).standard_normal((4000, 8)).astype(np.float32)
    cfg = SAEConfig(d_in=8, width=32, k=3, batch_size=64, lr=3e-3, batchtopk=batchtopk, dead_tokens=128,
                    resample_every=4, ckpt_every=5, ckpt_seconds=0, seed=1)
    total = 20 * 64
    ref = train_sae(_stream(X, 64, 0), cfg, tmp_path / "a", total_tokens=total, progress=False, log_every=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae(_crashing(_stream(X, 64, 0), 13), cfg, tmp_path / "b", total_tokens=total, progress=False,
                  log_every=5)
    latest = json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 10
    got = train_sae(_stream(X, 64, 0), cfg, tmp_path / "b", total_tokens=total, progress=False, log_every=5)
    for (n, p), (_, q) in zip(ref.named_parameters(), got.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(ref.threshold, got.threshold)
    assert ref.train_log == got.train_log
    assert [r["step"] for r in got.train_log] == [5, 10, 15, 20]
    assert not (tmp_path / "b" / "checkpoints").exists()
    # a checkpoint made with another architecture is refused, not silently mixed
    with pytest.raises(RuntimeError):
        train_sae(_crashing(_stream(X, 64, 0), 6), cfg, tmp_path / "c", total_tokens=total, progress=False)
    bad = SAEConfig(d_in=8, width=64, k=3, batch_size=64, ckpt_every=5, seed=1)
    for wrong in ({"ckpt_seconds": float("nan")}, {"ckpt_seconds": -1}, {"ckpt_every": -5}, {"ckpt_every": 2.5}):
        with pytest.raises(MechdiffError, match="ckpt_"):
            SAEConfig(d_in=8, width=64, k=3, batch_size=64, **wrong).validate()
    with pytest.raises(MechdiffError, match="width"):
        train_sae(_stream(X, 64, 0), bad, tmp_path / "c", total_tokens=total, progress=False)


@pytest.mark.parametrize("damage", ["optim.pt", "model.safetensors", "train_state.safetensors", "state.json",
                                    "latest.json"])
def test_a_damaged_checkpoint_is_one_line_that_says_what_to_delete(tmp_path, damage):
    """A checkpoint file truncated on disk (a disk fault; kills cannot do it): a one-line error naming the folder to
    delete, not a torch / safetensors traceback; once deleted, training starts over and matches a clean run."""
    import shutil

    X = np.random.default_rng(0).standard_normal((4000, 8)).astype(np.float32)
    cfg = SAEConfig(d_in=8, width=32, k=3, batch_size=64, lr=3e-3, ckpt_every=5, ckpt_seconds=0, seed=1)
    total = 20 * 64
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae(_crashing(_stream(X, 64, 0), 13), cfg, tmp_path / "b", total_tokens=total, progress=False)
    root = tmp_path / "b" / "checkpoints"
    target = root / "latest.json" if damage == "latest.json" else next(root.glob(f"*/{damage}"))
    with open(target, "r+b") as f:
        f.truncate(max(1, target.stat().st_size // 3))
    with pytest.raises(MechdiffError, match=rf"^SAE checkpoint in {re.escape(str(root))} is unreadable \(.*\): "
                                            rf"delete {re.escape(str(root))} to train this SAE from scratch$") as e:
        train_sae(_stream(X, 64, 0), cfg, tmp_path / "b", total_tokens=total, progress=False)
    assert "\n" not in str(e.value)
    shutil.rmtree(root)
    got = train_sae(_stream(X, 64, 0), cfg, tmp_path / "b", total_tokens=total, progress=False)
    ref = train_sae(_stream(X, 64, 0), cfg, tmp_path / "a", total_tokens=total, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), got.parameters()))


def test_per_model_scale_resumes_from_a_checkpoint(tmp_path):
    """A crosscoder with one input scale per model, crashed after a checkpoint and resumed: the same SAE, scales
    included, as an uninterrupted run (the per-block scale is a vector buffer; a fresh SAE holds a scalar)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 8)).astype(np.float32)
    X = np.c_[x, 3.0 * x + 0.1 * rng.standard_normal((4000, 8)).astype(np.float32)]
    cfg = SAEConfig(d_in=8, width=32, k=3, batch_size=64, lr=3e-3, n_blocks=2, block_scale=True, ckpt_every=5,
                    ckpt_seconds=0, seed=1)
    total = 20 * 64
    ref = train_sae(_stream(X, 64, 0), cfg, tmp_path / "a", total_tokens=total, progress=False, log_every=5)
    assert ref.input_scale.shape == (2,)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae(_crashing(_stream(X, 64, 0), 13), cfg, tmp_path / "b", total_tokens=total, progress=False,
                  log_every=5)
    got = train_sae(_stream(X, 64, 0), cfg, tmp_path / "b", total_tokens=total, progress=False, log_every=5)
    assert torch.equal(ref.input_scale, got.input_scale)
    for (n, p), (_, q) in zip(ref.named_parameters(), got.named_parameters()):
        assert torch.equal(p, q), n


def test_checkpoints_by_wall_time_resume_to_the_same_sae(tmp_path):
    """With ckpt_every off and ckpt_seconds tiny, a checkpoint follows every step: a crash loses nothing, and the
    resumed SAE equals the uninterrupted one bit for bit."""
    X = np.random.default_rng(1).standard_normal((3000, 8)).astype(np.float32)
    cfg = SAEConfig(d_in=8, width=32, k=3, batch_size=64, lr=3e-3, dead_tokens=128, ckpt_every=0,
                    ckpt_seconds=1e-9, seed=2)
    total = 16 * 64
    ref = train_sae(_stream(X, 64, 0), cfg, tmp_path / "a", total_tokens=total, progress=False, log_every=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae(_crashing(_stream(X, 64, 0), 11), cfg, tmp_path / "b", total_tokens=total, progress=False,
                  log_every=4)
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())["step"] == 11
    got = train_sae(_stream(X, 64, 0), cfg, tmp_path / "b", total_tokens=total, progress=False, log_every=4)
    for (n, p), (_, q) in zip(ref.named_parameters(), got.named_parameters()):
        assert torch.equal(p, q), n
    assert ref.train_log == got.train_log


def test_checkpoint_loads_without_project_and_metrics_match_numpy(tmp_path):
    from safetensors.numpy import load_file
    from sklearn.metrics import r2_score

    X = (np.random.default_rng(0).standard_normal((3000, 10)) * 5 + 2).astype(np.float32)
    for batchtopk in (False, True):
        cfg = SAEConfig(d_in=10, width=40, k=3, batch_size=100, lr=3e-3, batchtopk=batchtopk, seed=0,
                        meta={"site": "L1.resid_post", "source": "base"})
        sae = train_sae(_stream(X, 100, 0), cfg, tmp_path / str(batchtopk), total_tokens=30 * 100,
                        progress=False)
        t = load_file(str(tmp_path / str(batchtopk) / "sae.safetensors"))
        c = json.loads((tmp_path / str(batchtopk) / "cfg.json").read_text())
        assert t["W_enc"].shape == (40, 10) and t["W_dec"].shape == (10, 40)
        assert c["site"] == "L1.resid_post" and c["k"] == 3 and c["input_scale"] > 0
        x = X[:500].astype(np.float64)
        pre = (x * c["input_scale"] - t["b_pre"]) @ t["W_enc"].T + t["b_enc"]
        if batchtopk:
            z = np.where(pre > c["threshold"], pre, 0.0)
        else:
            z = np.zeros_like(pre)
            idx = np.argsort(-pre, axis=1)[:, :3]
            np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
        xh = (z @ t["W_dec"].T + t["b_pre"]) / c["input_scale"]
        with torch.no_grad():
            ours = sae(torch.from_numpy(X[:500])).double().numpy()
        np.testing.assert_allclose(xh, ours, atol=1e-4)
        fired = np.zeros(sae.width, dtype=bool)
        ev = eval_sae(sae, X[:500], fired_out=fired)
        np.testing.assert_array_equal(fired, (z > 0).any(0))
        assert ev["fvu"] == pytest.approx(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-4)
        assert ev["fvu"] == pytest.approx(1 - r2_score(x, xh, multioutput="variance_weighted"), rel=1e-4)
        assert ev["l0"] == pytest.approx((z > 0).sum(1).mean(), rel=1e-6)
        assert ev["mse"] == pytest.approx(((x - xh) ** 2).mean(), rel=1e-4)
        assert ev["dead_pct"] == pytest.approx(100 * (~(z > 0).any(0)).mean())
        loaded = load_sae(tmp_path / str(batchtopk))
        with torch.no_grad():
            assert torch.allclose(loaded(torch.from_numpy(X[:50])), sae(torch.from_numpy(X[:50])), atol=1e-6)
        assert loaded.meta["source"] == "base"
        save_sae(loaded, tmp_path / "copy", meta={"model_id": "m"})
        again = load_sae(tmp_path / "copy")
        assert torch.equal(again.W_dec, sae.W_dec) and again.meta["model_id"] == "m"
        assert again.config_dict() == sae.config_dict()


def test_bad_inputs_raise():
    cfg = SAEConfig(d_in=4, width=8, k=2, batch_size=4)
    with pytest.raises(MechdiffError):
        train_sae(iter([np.zeros((4, 5), np.float32)]), cfg, None, total_tokens=8, progress=False)
    with pytest.raises(MechdiffError):
        train_sae(iter([np.full((4, 4), np.nan, np.float32)]), cfg, None, total_tokens=8, progress=False)
    with pytest.raises(MechdiffError):
        train_sae(iter([]), cfg, None, total_tokens=8, progress=False)
    with pytest.raises(MechdiffError):
        TopKSAE(4, 8, 9)
    with pytest.raises(MechdiffError):
        eval_sae(TopKSAE(4, 8, 2), np.zeros((3, 5)))
    with pytest.raises(MechdiffError):
        load_sae("/nonexistent/dir")


def test_spliced_identity_sae_recovers_everything():
    from mechdiff.model.sites import Site
    from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
    from mechdiff.model.tokens import encode

    texts = ["the cat sat on the mat", "a dog ran in the park today", "tea is hot", "rain falls on the red roof"]
    tok = make_tiny_tokenizer(texts)
    model = make_tiny_model(len(tok), n_layers=2, d_model=16, seed=0)
    enc = encode(tok, texts)
    d = 16
    ident = TopKSAE(d, 2 * d, 2 * d)
    with torch.no_grad():  # z = relu([x; -x]), x_hat = relu(x) - relu(-x) = x
        eye = torch.eye(d)
        ident.W_enc.copy_(torch.cat([eye, -eye]))
        ident.dec.copy_(torch.cat([eye, -eye]))
        ident.input_scale.fill_(0.5)
    rows = np.arange(len(texts))
    for kind in ("resid_post", "mlp_out", "resid_pre"):
        site = Site(1, kind)
        m = spliced_metrics(model, enc, rows, site, ident, batch_size=3)
        assert m["kl_sae"] == pytest.approx(0.0, abs=1e-6) and m["kl_zero"] > 1e-4
        assert m["kl_recovered"] == pytest.approx(1.0, abs=1e-4)
        assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
        assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-5)
    # a random SAE recovers less; ref_logits in `rows` order are honoured; decision-only splicing works
    rand = TopKSAE(d, 32, 2, seed=1)
    m = spliced_metrics(model, enc, rows, Site(1, "resid_post"), rand, batch_size=2)
    assert m["kl_recovered"] < 0.99
    from mechdiff.model.tokens import batches

    _, ids, mask, pos = next(batches(enc, rows, 4, 0, sort_by_length=False))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(pos)), pos]
    m2 = spliced_metrics(model, enc, rows, Site(1, "resid_post"), ident, ref, positions="decision")
    assert m2["kl_clean"] == pytest.approx(0.0, abs=1e-6) and m2["kl_recovered"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(MechdiffError):
        spliced_metrics(model, enc, rows, Site(1, "resid_post"), TopKSAE(d, 8, 2, n_blocks=2))


# ------------------------------------------------------------------ spliced delta SAE and crosscoder

_PAIR_TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "tea is hot", "rain falls on the red roof",
               "the red cat ran to the park"]


def _edited_pair():
    """A tiny base model and a tuned copy with a planted rank-2 change at L1's MLP output (U: d x 2)."""
    import copy

    from mechdiff.model.recipes import plant_edit
    from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
    from mechdiff.model.tokens import encode

    tok = make_tiny_tokenizer(_PAIR_TEXTS)
    base = make_tiny_model(len(tok), n_layers=3, d_model=16, seed=0)
    tuned = copy.deepcopy(base)
    info = plant_edit(tuned, layer=1, kind="mlp_out", rank=2, scale=50.0, seed=1)  # a visible change
    return base, tuned, encode(tok, _PAIR_TEXTS), info.directions


def _span_sae(V: np.ndarray, d_in: int) -> TopKSAE:
    """A hand-built SAE (crosscoder when V has 2 d_in rows) with x_hat = V V^T x exactly (V orthonormal columns)."""
    D, r = V.shape
    sae = TopKSAE(d_in, 2 * r, 2 * r, n_blocks=D // d_in)
    Vt = torch.from_numpy(np.ascontiguousarray(V.T)).float()
    with torch.no_grad():  # z = relu([V^T x; -V^T x]), x_hat = V z+ - V z- = V V^T x
        sae.W_enc.copy_(torch.cat([Vt, -Vt]))
        sae.dec.copy_(torch.cat([Vt, -Vt]))
        sae.input_scale.fill_(0.7)
    return sae


def _zero_sae(d_in: int, n_blocks: int = 1) -> TopKSAE:
    sae = TopKSAE(d_in, 8, 2, n_blocks=n_blocks, seed=3)
    with torch.no_grad():
        sae.dec.zero_()
    return sae


@torch.no_grad()
def _reference(model, enc, rows, layer: int, new_rows, skip: int = 1) -> tuple[float, float]:
    """Token-mean CE and prompt-mean decision KL(p || p_clean), one unpadded prompt at a time, with the output of
    block `layer` at positions skip.. replaced by new_rows(i) (T-skip, d) through a hook of the test's own (numpy
    maths)."""
    blk = model.model.layers[layer]
    ce_sum, n_tok, kl = 0.0, 0, []
    for i in rows:
        ids = torch.tensor([enc.ids[i]])
        clean = model(input_ids=ids).logits[0].double().numpy()
        new = torch.as_tensor(new_rows(i)).float()

        def hook(_m, _a, out, _new=new):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[0, skip:] = _new
            return (h, *out[1:]) if isinstance(out, tuple) else h

        hd = blk.register_forward_hook(hook)
        try:
            lg = model(input_ids=ids).logits[0].double().numpy()
        finally:
            hd.remove()
        lp = lg - np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1, keepdims=True)) - lg.max(1, keepdims=True)
        tg = np.asarray(enc.ids[i][1:])
        ce_sum += float(-lp[np.arange(len(tg)), tg].sum())
        n_tok += len(tg)
        q = clean[enc.decision[i]]
        lq = q - q.max() - np.log(np.exp(q - q.max()).sum())
        p = lp[enc.decision[i]]
        kl.append(float((np.exp(p) * (p - lq)).sum()))
    return ce_sum / n_tok, float(np.mean(kl))


def _hidden(model, enc, i: int, layer: int) -> np.ndarray:
    """L<layer>.resid_post of prompt i (T, d) from output_hidden_states (not the library's hooks)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([enc.ids[i]]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0].double().numpy()


def test_spliced_delta_sae_planted_change():
    from mechdiff.model.sites import Site

    base, tuned, enc, U = _edited_pair()
    d, rows = 16, np.arange(len(_PAIR_TEXTS))
    models = {"base": base, "tuned": tuned}
    Q = np.linalg.qr(np.c_[U, np.random.default_rng(0).standard_normal((d, d - 2))])[0]
    for kind in ("resid_post", "mlp_out"):
        site = Site(1, kind)
        # the planted change lies in span(U): a delta SAE spanning U reconstructs it exactly
        m = spliced_metrics(models, enc, rows, site, _span_sae(U, d), source="delta", batch_size=2)
        assert m["kl_zero"] > 0.05 and abs(m["ce_zero"] - m["ce_clean"]) > 0.03, m
        assert m["kl_clean"] == pytest.approx(0.0, abs=1e-9)
        assert m["kl_sae"] == pytest.approx(0.0, abs=1e-6)
        assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-5)
        assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-5)
        assert m["kl_recovered"] == pytest.approx(1.0, abs=1e-5)
        # an SAE outputting 0, or one spanning only the complement of U, recovers nothing
        for sae in (_zero_sae(d), _span_sae(Q[:, 2:], d)):
            m0 = spliced_metrics(models, enc, rows, site, sae, source="delta", batch_size=2)
            assert m0["ce_recovered"] == pytest.approx(0.0, abs=1e-4)
            assert m0["kl_recovered"] == pytest.approx(0.0, abs=1e-4)
            assert m0["kl_zero"] == m["kl_zero"] and m0["ce_clean"] == m["ce_clean"]
    # decision-token splicing only: KL fully recovered, CE recovered undefined
    md = spliced_metrics(models, enc, rows, Site(1), _span_sae(U, d), source="delta", positions="decision")
    assert md["kl_recovered"] == pytest.approx(1.0, abs=1e-5) and np.isnan(md["ce_recovered"])


def test_spliced_delta_matches_independent_reference():
    """A delta SAE keeping only u1 of the planted change: CE / KL vs hooks + numpy on unpadded prompts."""
    from mechdiff.model.sites import Site

    base, tuned, enc, U = _edited_pair()
    rows = np.arange(len(_PAIR_TEXTS))
    u1 = U[:, :1]
    m = spliced_metrics({"base": base, "tuned": tuned}, enc, rows, Site(1), _span_sae(u1, 16), source="delta",
                        batch_size=3)
    hb = {i: _hidden(base, enc, i, 1) for i in rows}
    ht = {i: _hidden(tuned, enc, i, 1) for i in rows}
    S = enc.shared_prefix  # the chat template's shared opening keeps its clean values, like the sink at 0
    assert S >= 2
    ce_sae, kl_sae = _reference(tuned, enc, rows, 1, lambda i: (hb[i] + (ht[i] - hb[i]) @ u1 @ u1.T)[S:], S)
    ce_zero, kl_zero = _reference(tuned, enc, rows, 1, lambda i: hb[i][S:], S)
    ce_clean, kl_clean = _reference(tuned, enc, rows, 1, lambda i: ht[i][S:], S)
    assert kl_clean == pytest.approx(0.0, abs=1e-9) and 0.05 < (ce_zero - ce_sae) / (ce_zero - ce_clean) < 0.95
    for key, want in (("ce_sae", ce_sae), ("ce_zero", ce_zero), ("ce_clean", ce_clean), ("kl_sae", kl_sae),
                      ("kl_zero", kl_zero)):
        assert m[key] == pytest.approx(want, rel=1e-4, abs=1e-6), key
    assert m["ce_recovered"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), rel=1e-3)
    assert m["kl_recovered"] == pytest.approx((kl_zero - kl_sae) / kl_zero, rel=1e-3)
    assert m["n_prompts"] == len(rows) and m["n_tokens"] == sum(len(x) - 1 for x in enc.ids)
    # skip given: splicing from position 1 on is the reference with only the sink kept
    m1 = spliced_metrics({"base": base, "tuned": tuned}, enc, rows, Site(1), _span_sae(u1, 16), source="delta",
                         batch_size=3, skip=1)
    ce1, kl1 = _reference(tuned, enc, rows, 1, lambda i: (hb[i] + (ht[i] - hb[i]) @ u1 @ u1.T)[1:])
    assert m1["ce_sae"] == pytest.approx(ce1, rel=1e-4) and m1["kl_sae"] == pytest.approx(kl1, rel=1e-4, abs=1e-6)


def test_spliced_crosscoder_per_model():
    from mechdiff.model.sites import Site

    base, tuned, enc, _ = _edited_pair()
    d, rows = 16, np.arange(len(_PAIR_TEXTS))
    models = {"base": base, "tuned": tuned}
    site = Site(1)
    eye = np.eye(2 * d)
    m = spliced_metrics(models, enc, rows, site, _span_sae(eye, d), source="crosscoder", batch_size=2)
    m0 = spliced_metrics(models, enc, rows, site, _zero_sae(d, 2), source="crosscoder", batch_size=2)
    # reconstructs the base block exactly, outputs 0 for the tuned block: the blocks go to their own models
    mb = spliced_metrics(models, enc, rows, site, _span_sae(eye[:, :d], d), source="crosscoder", batch_size=4)
    for sfx in ("_base", "_tuned"):
        assert m[f"kl_zero{sfx}"] > 1e-2
        assert m[f"kl_sae{sfx}"] == pytest.approx(0.0, abs=1e-6)
        assert m[f"ce_recovered{sfx}"] == pytest.approx(1.0, abs=1e-5)
        assert m[f"kl_recovered{sfx}"] == pytest.approx(1.0, abs=1e-5)
        assert m0[f"ce_recovered{sfx}"] == pytest.approx(0.0, abs=1e-9)
        assert m0[f"kl_recovered{sfx}"] == pytest.approx(0.0, abs=1e-9)
    assert mb["ce_recovered_base"] == pytest.approx(1.0, abs=1e-5) and mb["kl_recovered_base"] == pytest.approx(1.0, abs=1e-5)
    assert mb["ce_recovered_tuned"] == pytest.approx(0.0, abs=1e-9) and mb["kl_recovered_tuned"] == pytest.approx(0.0, abs=1e-9)
    assert m["ce_clean_base"] != pytest.approx(m["ce_clean_tuned"], abs=1e-4)
    assert "ce_recovered" not in m
    # a random crosscoder: each model's spliced CE / KL against hooks + numpy on unpadded prompts
    cc = TopKSAE(d, 24, 3, n_blocks=2, seed=4)
    hb = {i: _hidden(base, enc, i, 1) for i in rows}
    ht = {i: _hidden(tuned, enc, i, 1) for i in rows}
    S = enc.shared_prefix
    cc.set_input_scale(torch.from_numpy(np.concatenate([np.c_[hb[i], ht[i]][S:] for i in rows])).float())
    mr = spliced_metrics(models, enc, rows, site, cc, source="crosscoder", batch_size=3)
    with torch.no_grad():
        rec = {i: cc(torch.from_numpy(np.c_[hb[i], ht[i]][S:]).float()).double().numpy() for i in rows}
    for b, (name, model) in enumerate(models.items()):
        ce, kl = _reference(model, enc, rows, 1, lambda i, _b=b: rec[i][:, _b * d : (_b + 1) * d], S)
        ce0, kl0 = _reference(model, enc, rows, 1, lambda i: np.zeros((len(enc.ids[i]) - S, d)), S)
        assert mr[f"ce_sae_{name}"] == pytest.approx(ce, rel=1e-4), name
        assert mr[f"kl_sae_{name}"] == pytest.approx(kl, rel=1e-4, abs=1e-6), name
        assert mr[f"ce_zero_{name}"] == pytest.approx(ce0, rel=1e-4), name
        assert mr[f"kl_zero_{name}"] == pytest.approx(kl0, rel=1e-4), name


def test_spliced_bad_inputs_are_one_line_errors():
    from mechdiff.model.sites import Site
    from mechdiff.model.tiny import make_tiny_model
    from mechdiff.model.tokens import Encoded

    base, tuned, enc, U = _edited_pair()
    rows, site, d = np.arange(3), Site(1), 16
    delta, cc = _span_sae(U, d), _span_sae(np.eye(2 * d), d)
    other_vocab = make_tiny_model(len(enc.ids) + 200, n_layers=3, d_model=16, seed=0)
    shifted = Encoded([list(x) for x in enc.ids], list(enc.decision))
    shifted.ids[1][2] = shifted.ids[1][2] + 1
    bad = [
        lambda: spliced_metrics(tuned, enc, rows, site, delta, source="delta"),  # one model for a delta SAE
        lambda: spliced_metrics({"tuned": tuned}, enc, rows, site, delta, source="delta"),  # base missing
        lambda: spliced_metrics({"base": base}, enc, rows, site, cc, source="crosscoder"),  # tuned missing
        lambda: spliced_metrics({"base": base, "tuned": tuned}, enc, rows, site, delta),  # no source
        lambda: spliced_metrics({"base": base, "tuned": tuned}, enc, rows, site, delta, source="bogus"),
        lambda: spliced_metrics({"base": base, "tuned": tuned}, enc, rows, site, delta, source="crosscoder"),
        lambda: spliced_metrics({"base": base, "tuned": tuned}, enc, rows, site, cc, source="delta"),
        lambda: spliced_metrics({"base": base, "tuned": other_vocab}, enc, rows, site, delta, source="delta"),
        lambda: spliced_metrics({"base": base, "tuned": tuned}, {"base": enc, "tuned": shifted}, rows, site, cc,
                                source="crosscoder"),
        lambda: spliced_metrics({"base": base, "tuned": tuned}, enc, rows, site, cc, np.zeros((3, 5)),
                                source="crosscoder"),
        lambda: spliced_metrics({"base": base, "tuned": tuned}, enc, rows, site, _span_sae(np.eye(8), 8),
                                source="delta"),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(MechdiffError) as e:
            call()
        assert "\n" not in str(e.value), i
    # the same tokens given per model are accepted, and base / tuned by name work as single-model sources
    same = Encoded([list(x) for x in enc.ids], list(enc.decision))
    m = spliced_metrics({"base": base, "tuned": tuned}, {"base": enc, "tuned": same}, rows, site, delta,
                        source="delta")
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-5)
    ident = _span_sae(np.eye(d), d)
    for name, model in (("base", base), ("tuned", tuned)):
        mb = spliced_metrics({"base": base, "tuned": tuned}, enc, rows, site, ident, source=name)
        assert mb == spliced_metrics(model, enc, rows, site, ident)
        assert mb["kl_recovered"] == pytest.approx(1.0, abs=1e-5)


def test_crosscoder_norm_shares_planted():
    from mechdiff.sae.evaluate import crosscoder_norm_shares

    d = 3
    shares = np.array([0.02, 0.07, 0.33, 0.52, 0.68, 0.83, 0.93, 0.99])  # tuned share ||d_t|| / (||d_b|| + ||d_t||)
    cc = TopKSAE(d, len(shares), 2, n_blocks=2)
    rng = np.random.default_rng(0)
    u = rng.standard_normal((len(shares), d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    with torch.no_grad():
        cc.dec.copy_(torch.as_tensor(np.concatenate([(1 - shares)[:, None] * u, shares[:, None] * u], 1),
                                     dtype=torch.float32))
    counts, rows = crosscoder_norm_shares(cc)
    assert counts == {"n_base_only": 2, "n_tuned_only": 2, "n_shared": 3}
    live = np.array([1, 0, 1, 0, 0, 1, 1, 0], dtype=bool)  # dead latents leave the *_live counts only
    counts_live, _ = crosscoder_norm_shares(cc, live=live)
    assert counts_live == {**counts, "n_base_only_live": 1, "n_tuned_only_live": 1, "n_shared_live": 1}
    with pytest.raises(MechdiffError, match="flags"):
        crosscoder_norm_shares(cc, live=live[:3])
    hist, edges = np.histogram(shares, bins=20, range=(0, 1))
    assert [r["n_latents"] for r in rows] == hist.tolist()
    np.testing.assert_allclose([r["rel_norm_tuned"] for r in rows], (edges[:-1] + edges[1:]) / 2, atol=1e-3)
    with pytest.raises(MechdiffError, match="crosscoder"):
        crosscoder_norm_shares(TopKSAE(d, 4, 2))


def test_init_seed_distinct_per_source_and_base_keeps_seed():
    from mechdiff.errors import MechdiffError
    from mechdiff.sae.sources import SOURCES, init_seed

    seeds = [init_seed(17, s) for s in SOURCES]
    assert seeds[0] == 17 and len(set(seeds)) == len(SOURCES)
    with pytest.raises(MechdiffError, match="unknown SAE source"):
        init_seed(17, "nope")


def test_per_model_scale_reads_a_scaled_copy_as_shared(tmp_path):
    """tuned = 4 x base with the same features: with one input scale for [x_base, x_tuned] every latent leans to
    the tuned block (relative norm c / (1 + c) = 0.8); with one scale per model (`block_scale`, the stage's
    `sae.crosscoder_scale: per_model`) the shared latents sit at 0.5 again. The per-block scales are each model's
    own (mean ||s_b x_b||^2 = d_in, against numpy), and survive save / load and a checkpoint resume."""
    from mechdiff.sae.model import load_sae, save_sae

    d, n_atoms = 16, 32
    S = _dictionary(n_atoms, d, 2)
    rng = np.random.default_rng(5)
    base = _codes(20000, n_atoms, 3, rng) @ S
    X = np.c_[base, 4.0 * base].astype(np.float32)
    rel = {}
    for per_model in (False, True):
        cfg = SAEConfig(d_in=d, width=64, k=3, batch_size=256, lr=3e-3, n_blocks=2, seed=0, block_scale=per_model)
        cc = train_sae(_stream(X, 256, 0), cfg, None, total_tokens=800 * 256, progress=False)
        Wn = cc.W_dec.detach().numpy()
        Wn = Wn / np.linalg.norm(Wn, axis=0, keepdims=True)
        best = (np.c_[S, 4 * S] / np.linalg.norm(np.c_[S, 4 * S], axis=1, keepdims=True) @ Wn).argmax(1)
        rel[per_model] = cc.relative_norms(block=1).numpy()[best]
        if per_model:
            first = np.asarray(next(iter(_stream(X, 256, 0))), dtype=np.float64)  # the scales' batch: the first
            want = [np.sqrt(d / (first[:, b * d:(b + 1) * d] ** 2).sum(1).mean()) for b in (0, 1)]
            np.testing.assert_allclose(cc.input_scale.numpy(), want, rtol=1e-5)
            assert float(cc.input_scale[0]) == pytest.approx(4 * float(cc.input_scale[1]), rel=1e-5)
            x = torch.from_numpy(X[:512])
            again = load_sae(save_sae(cc, tmp_path / "cc"))
            assert torch.equal(again.input_scale, cc.input_scale)
            assert torch.allclose(again(x), cc(x), rtol=1e-6, atol=1e-6)
            # reconstructions come back in each model's own units
            fvu = ((cc(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
            assert float(fvu.detach()) < 0.1
    assert np.all(np.abs(rel[False] - 0.8) < 0.05), rel[False]
    assert np.all(np.abs(rel[True] - 0.5) < 0.05), rel[True]


def test_spliced_clean_memo_shared_across_saes():
    """One CleanMemo for every SAE at a site (what evaluate_saes does): the same numbers bit for bit as separate
    runs, with each model's whole clean forward run once per batch instead of once per SAE; a memo too small to
    keep anything gives the same numbers again."""
    from mechdiff.model.sites import Site, find_blocks
    from mechdiff.sae.evaluate import CleanMemo

    base, tuned, enc, _ = _edited_pair()
    d, rows = 16, np.arange(len(_PAIR_TEXTS))
    models = {"base": base, "tuned": tuned}
    site = Site(1)
    saes = [("base", TopKSAE(d, 24, 3, seed=1)), ("tuned", TopKSAE(d, 24, 3, seed=2)),
            ("delta", TopKSAE(d, 24, 3, seed=5)), ("crosscoder", TopKSAE(d, 24, 3, n_blocks=2, seed=4))]

    def run(memo):
        out = []
        for src, sae in saes:
            m = models if src in ("delta", "crosscoder") else models[src]
            out.append(spliced_metrics(m, enc, rows, site, sae, source=src, batch_size=2, memo=memo))
        return out

    calls = {"n": 0}

    def count(_m, _a, _o):
        calls["n"] += 1

    # the last block runs only in whole forwards and splices (a capture stops at the site)
    hooks = [find_blocks(m)[-1].register_forward_hook(count) for m in models.values()]
    try:
        alone = run(None)
        n_alone, calls["n"] = calls["n"], 0
        shared = run(CleanMemo())
        n_shared, calls["n"] = calls["n"], 0
        tiny = run(CleanMemo(keep_bytes=0))
    finally:
        for h in hooks:
            h.remove()
    assert shared == alone and tiny == alone
    n_batches = -(-len(rows) // 2)
    # splices: 2 per target model per SAE (sae, zero) = 10; whole clean forwards: 5 alone, 2 shared (per batch)
    assert n_alone == n_batches * (10 + 5) and n_shared == n_batches * (10 + 2)
