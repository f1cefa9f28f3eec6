"""Known-answer tests of the identifiability gates (mechdiff.analysis.gates)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechdiff.analysis.behaviour import decision_logits
from mechdiff.analysis.features import cohens_d
from mechdiff.analysis.gates import (
    Pass,
    best_matches,
    ccis,
    corruption_consistency,
    distribution_variance,
    feature_contribution,
    permutation_p,
    region_coverage,
    top_share,
)
from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site
from mechdiff.sae.model import TopKSAE
from mechdiff.stats.kl import kl_divergence
from tests.analysis.conftest import random_texts


def test_region_planted_feature_fails_coverage():
    regions = ["North", "South", "East", "West", "pan-Indian", "North", "South", "East"]
    fires = np.zeros((8, 3), dtype=bool)
    fires[[0, 5], 0] = True  # feature 0: North only
    fires[[0, 1, 2], 1] = True  # feature 1: three regions
    fires[[0, 4], 2] = True  # feature 2: North + pan-Indian (not a region)
    n = region_coverage(fires, regions)
    assert n.tolist() == [1, 3, 1]
    assert (n >= 3).tolist() == [False, True, False]


def test_corruption_consistency_hand_numbers():
    clean = np.array([2.0, 3.0, 4.0])
    cor = {"entity": np.array([0.0, 1.0, 2.0]), "counterfactual": np.array([1.0, 2.0, 3.0]),
           "paraphrase": np.array([2.0, 3.0, 4.0])}
    # pooled SD = 1 for every pair: d = difference of means = 2, 1, 0
    res = corruption_consistency(clean, cor)
    assert res["d"] == pytest.approx({"entity": 2.0, "counterfactual": 1.0, "paraphrase": 0.0})
    assert res["mean_d"] == pytest.approx(1.0)
    assert res["sd_d"] == pytest.approx(np.std([2.0, 1.0, 0.0]))
    assert not res["consistent"]  # SD 0.816 > 0.3: a possible backup-pathway illusion
    same = corruption_consistency(clean, {m: np.array([0.0, 1.0, 2.0]) for m in cor})
    assert same["mean_d"] == pytest.approx(2.0) and same["sd_d"] == pytest.approx(0.0) and same["consistent"]
    assert res["d"]["entity"] == pytest.approx(float(cohens_d(cor["entity"], clean)[0]))


def test_matching_variance_and_top_share():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 8))
    b = a[[2, 0, 1, 4, 3]] * -3.0  # the same directions, permuted, sign-flipped, rescaled
    j, c = best_matches(a, b)
    assert j.tolist() == [1, 2, 0, 4, 3] and np.allclose(c, 1.0)
    means = {"x": np.arange(5.0), "y": np.zeros(5)}
    var = distribution_variance({"x": a, "y": b}, means, match_cos=0.7)
    assert np.allclose(var["x"], np.var(np.stack([np.arange(5.0), np.zeros(5)], 1), axis=1))
    assert top_share(np.array([1.0, 5.0, 3.0, 2.0]), 0.5).tolist() == [False, True, True, False]


def test_permutation_p_and_ccis():
    clean = np.r_[np.full(10, 0.5), np.full(10, 0.01)]
    abl = np.r_[np.full(10, 0.1), np.full(10, 0.01)]
    target = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    eff, p = permutation_p(clean, abl, target, n_perm=999, seed=0)
    assert eff == pytest.approx(0.8)
    assert p == pytest.approx(1 / 1000)  # no relabelling of the pool reaches the targets' 80% drop
    assert ccis(0.8, 0.5, 0.1, 0.05, 0.05, eps=0.0) == pytest.approx(0.8 * 0.5 / 0.2)


@pytest.fixture(scope="module")
def tiny():
    from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
    from mechdiff.model.tokens import encode

    texts = random_texts(12, seed=3)
    tok = make_tiny_tokenizer(texts)
    model = make_tiny_model(len(tok), n_layers=4, d_model=64, seed=0).eval()
    return model, encode(tok, texts)


def _planted_sae(direction: torch.Tensor) -> TopKSAE:
    """Two latents that fire (value 5) on every row: 0 writes `direction`, 1 (the look-alike) nearly nothing."""
    sae = TopKSAE(64, 2, 2)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(5.0)
        sae.b_pre.zero_()
        sae.dec[0] = direction
        sae.dec[1] = direction * 1e-7
    return sae


def test_causal_feature_passes_and_lookalike_fails(tiny):
    model, enc = tiny
    site = Site.parse("L3.resid_post")
    rows = np.argsort(enc.lengths, kind="stable")
    pas = Pass(model, site, lambda sel, iv: decision_logits(model, enc, rows if sel is None else rows[sel],
                                                           batch_size=len(rows), intervene=iv),
               lengths=enc.lengths[rows])
    u = model.get_output_embeddings().weight[0].detach()
    sae = _planted_sae(u / u.norm() * 4.0)
    kls = []
    for feat in (0, 1):
        X = pas.acts.float()
        Z = torch.as_tensor(sae.encode(X.reshape(-1, 64)).detach().numpy()[:, feat]).reshape(X.shape[:2]).clone()
        Z[:, 0] = 0
        abl = pas.ablated(Z, feature_contribution(sae, feat))
        kls.append(float(kl_divergence(pas.clean.astype(np.float64), abl.astype(np.float64)).mean()))
    assert kls[0] > 0.05  # removing 5 x the planted direction moves the next-token distribution
    assert kls[1] < 1e-6  # the look-alike fires on the same tokens but writes nothing
    # ablating through the reused blocks equals a full forward with the same edit
    from mechdiff.analysis.gates import ablation

    full = decision_logits(model, enc, rows, batch_size=len(rows), intervene=ablation(site, Z, feature_contribution(sae, 1)))
    assert np.allclose(full, pas.clean, atol=1e-4)
    # the causal feature firing on some prompts only: running just those rows gives the full batch's answer
    Z0 = Z.clone()
    Z0[::2] = 0
    c0 = feature_contribution(sae, 0)
    some = pas.ablated(Z0, c0, np.flatnonzero((Z0.amax(1) > 0).numpy()))
    assert np.allclose(some, pas.ablated(Z0, c0), atol=1e-4)
    assert np.allclose(some[::2], pas.clean[::2]) and not np.allclose(some[1::2], pas.clean[1::2], atol=1e-3)


def test_bad_settings():
    from mechdiff.analysis.gates import GateSettings

    with pytest.raises(MechdiffError):
        GateSettings(top_share=0)


def test_run_gates_end_to_end_on_a_tiny_pair(tmp_path):
    """The whole funnel on a tiny pair with stores of its real activations: counts add up and shrink gate by gate."""
    import copy

    from mechdiff.analysis.gates import GateInputs, GateSettings, run_gates, site_acts
    from mechdiff.data.store import ActStore
    from mechdiff.model.tiny import make_tiny_tokenizer
    from mechdiff.model.tokens import encode

    texts = random_texts(40, seed=5, lo=5, hi=9)
    tok = make_tiny_tokenizer(texts, extra_words=["yes", "no", "maybe", "never"])
    from mechdiff.model.tiny import make_tiny_model

    base = make_tiny_model(len(tok), n_layers=4, d_model=64, seed=0).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.get_output_embeddings().weight[3] += 0.5  # the tuned model's behaviour change
        for prm in list(tuned.parameters())[-6:-3]:
            prm.add_(0.01 * torch.randn_like(prm, generator=torch.Generator().manual_seed(1)))
    enc = encode(tok, texts)
    site = Site.parse("L2.resid_post")
    rows = np.arange(len(texts))
    stores = {}
    for name, m in (("base", base), ("tuned", tuned)):
        acts = site_acts(m, enc, rows, site)
        st = ActStore.create(tmp_path / f"{name}.zarr", prompt_ids=rows, n_tokens=enc.lengths, datasets=["x"] * 40,
                             splits=["train"] * 40, sites={site.name: 64}, views={site.name: ["tokens"]}, attrs={},
                             tok_ids=np.concatenate([np.asarray(x) for x in enc.ids]))
        with st.writer() as w:
            w.append({}, {site.name: torch.cat(acts).numpy()}, n=40)
        stores[name] = ActStore.open(tmp_path / f"{name}.zarr")
    saes = {s: TopKSAE(64, 32, 8, seed=i) for i, s in enumerate(("base", "tuned", "delta"))}
    for s, sae in saes.items():
        with torch.no_grad():
            sae.b_enc.fill_(0.5)  # fire often enough to pass the coverage gate
            sae.dec.mul_(5.0 if s != "delta" else 1.0)
    regions = np.array(["North", "South", "East", "West", "pan-Indian"] * 8, dtype=object)
    corrupted = {m: [texts[(i + k + 1) % 40] for i in range(20, 30)] for k, m in enumerate(("a", "b", "c"))}
    inp = GateInputs(saes=saes, base=stores["base"], tuned=stores["tuned"], site=site, view="tokens",
                     regions=regions, train_rows=np.arange(0, 20), heldout_rows=np.arange(20, 40),
                     models={"base": base, "tuned": tuned}, enc=enc, tokenizer=tok, signature_id=3,
                     target_rows=np.arange(20, 30), control_rows=np.arange(30, 36), corrupted=corrupted,
                     neutral_rows=np.arange(36, 40), mc=(["cat dog", "sun moon"], [["yes", "no"], ["maybe", "never"]], [0, 1]))
    st = GateSettings(top_share=0.5, max_freq=1.0, min_regions=2, max_features=2, min_effect=0.0, min_kl=0.0,
                      n_perm=99)
    res = run_gates(inp, st)
    f = res.funnel
    counts = [f[k] for k in ("candidates", "variance", "sparsity", "coverage", "measured", "causal", "consistent",
                             "side_effects")]
    assert counts[0] == 96 and counts[1] == 48  # three SAEs of 32 latents; the top half by variance
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(s["measured"] for s in res.funnel_by_source.values()) == f["measured"] == len(res.features)
    assert f["causal"] >= 1  # min_effect 0: any feature that fires on a target prompt and moves anything is causal
    for r in res.features:
        assert 0 <= r["identifiability"] <= 1 and 0 < r["p"] <= 1
        if r["measured"]:
            assert np.isfinite(r["neutral_kl"]) and r["mc_acc_clean"] in (0.0, 0.5, 1.0)
    assert len(res.survivors) == f["side_effects"]
