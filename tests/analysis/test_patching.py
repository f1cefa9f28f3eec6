"""Patching: hook semantics, identity patch, prefix-cache exactness and the planted-edit known-answer test."""

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch

from mechdiff.analysis.patching import (
    decisions,
    kl_drop,
    layer_patch,
    layer_patch_decisions,
    layer_patch_direction,
    layer_patch_table,
    layer_recolour_stats,
    min_k,
    patch_kl,
    patched_logits,
    rank_alpha_sweep,
    reference_logits,
    saturation_k,
    src_decisions_in_dst,
    sweep_kl,
)
from mechdiff.analysis.similarity import linear_cka
from mechdiff.analysis.transport import fit_map, principal_cosines, recolour
from mechdiff.errors import MechdiffError
from mechdiff.model.cache import cache_check
from mechdiff.model.recipes import plant_edit
from mechdiff.model.sites import Site, capture, replace_at
from mechdiff.model.tokens import batches, pad_id
from mechdiff.stats.kl import kl_divergence

N_PROMPTS, N_TRAIN, LAYER, D = 150, 100, 2, 64


def _collect(model, tok, enc, sites):
    n = len(enc)
    acts = {s.name: np.zeros((n, D)) for s in sites}
    logits = np.zeros((n, len(tok)), np.float32)
    for r, ids, mask, pos in batches(enc, np.arange(n), 50, pad_id(tok)):
        a, lg = capture(model, ids, mask, sites, logits_at=pos)
        logits[r] = lg.numpy()
        for k, v in a.items():
            acts[k][r] = v[torch.arange(len(r)), pos].double().numpy()
    return acts, logits


def test_patch_touches_only_the_decision_position(world):
    tok, model, enc = world
    site = Site(1, "attn_out")
    rows = np.arange(8)
    r, ids, mask, pos = next(batches(enc, rows, 8, pad_id(tok), sort_by_length=False))
    vec = torch.randn(8, D)
    with replace_at(model, site, pos, vec):
        patched, _ = capture(model, ids, mask, [Site(3, "resid_post")])
    clean, _ = capture(model, ids, mask, [Site(3, "resid_post")])
    h0, h1 = clean["L3.resid_post"], patched["L3.resid_post"]
    for b in range(8):
        p = int(pos[b])
        torch.testing.assert_close(h1[b, :p], h0[b, :p])  # earlier positions are untouched
        assert (h1[b, p] - h0[b, p]).abs().max() > 1e-3  # the decision position did change


def test_prefix_cache_equals_full_forward_and_identity_patch(world):
    tok, model, enc = world
    site = Site(LAYER, "attn_out")
    acts, ref = _collect(model, tok, enc, [site])
    rows = np.arange(60, 90)
    vec = acts[site.name][rows] + np.random.default_rng(1).normal(size=(30, D))
    want = np.zeros((30, len(tok)), np.float32)
    # reference: replace_at + an ordinary full forward on the same rows, its logits read at the decision tokens
    sub = type(enc)([enc.ids[i] for i in rows], [enc.decision[i] for i in rows])
    for r, ids, mask, pos in batches(sub, np.arange(30), 16, pad_id(tok)):
        with replace_at(model, site, pos, torch.tensor(vec[r], dtype=torch.float32)):
            with torch.no_grad():
                want[r] = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(r)), pos].numpy()
    for pc in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the prefix-cache path must not fall back silently
            got = patched_logits(model, enc, rows, site, vec, prefix_cache=pc, batch_size=7)
        np.testing.assert_allclose(got, want, atol=2e-5)
        np.testing.assert_allclose(patched_logits(model, enc, rows, site, None, prefix_cache=pc), ref[rows],
                                   atol=2e-5)
        # the batches are right-padded with the encoding's own pad id; padded positions are masked, so any id serves
        repad = dataclasses.replace(enc, pad=(enc.pad + 1) % len(tok))
        np.testing.assert_allclose(patched_logits(model, repad, rows, site, vec, prefix_cache=pc, batch_size=7), got,
                                   atol=1e-5)
    # identity patch (tuned with its own activations) gives KL 0; KL and masked KL match the numpy reference
    allowed = np.arange(0, len(tok), 2)
    kl = sweep_kl(model, enc, rows, site, {"self": acts[site.name][rows], "vec": vec}, ref[rows], progress=False)
    kl_m = patch_kl(model, enc, rows, site, vec, ref[rows], allowed=allowed, batch_size=8)
    assert np.abs(kl["self"]).max() < 1e-6
    np.testing.assert_allclose(kl["vec"], kl_divergence(want, ref[rows]), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(kl_m, kl_divergence(want, ref[rows], allowed=allowed), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("kind,r", [("attn_out", 1), ("attn_out", 4), ("resid_post", 4)])
def test_planted_edit_known_answer(world, kind, r):
    tok, base, enc = world
    tuned = copy.deepcopy(base)
    info = plant_edit(tuned, layer=LAYER, kind=kind, rank=r, scale=2.0, seed=1)
    site = Site(LAYER, kind)
    sites = [Site(layer, "resid_post") for layer in range(4)] + [site]
    A, _ = _collect(base, tok, enc, sites)
    B, ref = _collect(tuned, tok, enc, sites)
    # (1) representations are identical before the edited layer and differ from it on
    cka = [linear_cka(A[f"L{layer}.resid_post"], B[f"L{layer}.resid_post"]) for layer in range(4)]
    assert all(abs(c - 1.0) < 1e-6 for c in cka[:LAYER])
    assert all(c < 1.0 - 1e-3 for c in cka[LAYER:])
    X, Y = A[site.name], B[site.name]
    m = fit_map(X[:N_TRAIN], Y[:N_TRAIN], site=site.name)
    # (3) the change basis finds the planted directions
    cos = principal_cosines(m.basis[:, :r], info.directions)
    assert cos.min() >= 0.9, cos
    # (2) the mapped patch at k = r recovers (almost) all of the full map's KL drop
    val = np.arange(N_TRAIN, N_PROMPTS)
    ks = sorted({0, max(r - 1, 0), r, r + 2})
    cfg = {"raw": recolour(X[val], m.stats), "full": m.apply(X[val])}
    cfg.update({f"k{k}": m.at_rank(k).apply(X[val]) for k in ks})
    kl = sweep_kl(tuned, enc, val, site, cfg, ref[val], progress=False)
    drop = {k: kl_drop(kl["raw"], kl[f"k{k}"], n_boot=200)["drop_pct"] for k in ks}
    full = kl_drop(kl["raw"], kl["full"], n_boot=200)
    assert drop[0] == pytest.approx(0.0, abs=1e-6)
    assert full["ci_low"] <= full["drop_pct"] <= full["ci_high"]
    strict = kind == "attn_out"  # resid_post after an MLP edit is not a linear function of the base vector
    assert full["drop_pct"] > (90.0 if strict else 30.0)
    assert drop[r] >= 0.9 * full["drop_pct"], (drop, full)
    if r > 1:
        assert drop[r - 1] < 0.9 * full["drop_pct"], (drop, full)
    assert min_k(ks, [drop[k] for k in ks], 0.9 * full["drop_pct"]) == r
    # the saturation rank finds r with no target given: 90 % of the best drop of the sweep (full rank included)
    assert saturation_k([*ks, D], [*(drop[k] for k in ks), full["drop_pct"]], 0.9) == r


class _MemStore:
    """An in-memory stand-in for an activation store: read(site, view, rows), read_logits(rows)."""

    def __init__(self, acts, logits=None):
        self.acts, self.logits = acts, logits

    def read(self, site, view="last", rows=None):
        a = self.acts[site]
        return a if rows is None else a[np.asarray(rows)]

    def read_logits(self, rows=None):
        return self.logits if rows is None else self.logits[np.asarray(rows)]


def test_layer_patch_identity_and_direction(world):
    tok, base, enc = world
    tuned = copy.deepcopy(base)
    plant_edit(tuned, layer=LAYER, kind="attn_out", rank=2, scale=2.0, seed=3)
    sites = [Site(layer, "resid_post") for layer in range(4)]
    A, _ = _collect(base, tok, enc, sites)
    B, ref = _collect(tuned, tok, enc, sites)
    train, rows = np.arange(N_TRAIN), np.arange(N_TRAIN, N_TRAIN + 30)
    st = layer_recolour_stats(_MemStore(A), _MemStore(B), sites, train)
    kl = layer_patch(tuned, enc, rows, sites, {s.name: A[s.name][rows] for s in sites}, st, ref[rows],
                     progress=False)
    # before the edit the re-coloured base vector equals the tuned one (same stats): no divergence
    assert kl["L0.resid_post"].max() < 1e-6 and kl["L1.resid_post"].max() < 1e-6
    assert kl["L2.resid_post"].mean() > 1e-4
    st_self = layer_recolour_stats(_MemStore(B), _MemStore(B), sites, train)
    kl_self = layer_patch(tuned, enc, rows, sites, {s.name: B[s.name][rows] for s in sites}, st_self,
                          ref[rows], progress=False)
    assert max(v.max() for v in kl_self.values()) < 1e-6


def test_block_reuse_and_own_reference_equal_full_forwards(world):
    """Jobs at many sites and kinds in one sweep: the prefix path (which reuses the blocks before each job's
    first changed block, and with ref_logits None its own unpatched logits) equals full forwards."""
    tok, model, enc = world
    sites = [Site(0, "resid_pre"), Site(1, "mlp_out"), Site(2, "attn_out"), Site(2, "resid_post"),
             Site(3, "resid_pre"), Site(3, "resid_post")]
    rows = np.arange(40, 63)
    rng = np.random.default_rng(5)
    configs = {f"{s.name}": rng.normal(size=(len(rows), D)) for s in sites}
    ref = reference_logits(model, enc, rows)
    full = sweep_kl(model, enc, rows, sites, configs, ref, progress=False, prefix_cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fast = sweep_kl(model, enc, rows, sites, configs, ref, progress=False, batch_size=5, decode_batch=9)
        own = sweep_kl(model, enc, rows, sites, configs, None, progress=False, batch_size=5)
    for name in configs:
        assert full[name].mean() > 1e-3  # the patches change the output
        np.testing.assert_allclose(fast[name], full[name], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(own[name], full[name], rtol=1e-4, atol=1e-7)
    # the full-forward fallback with its own reference (jobs may come before their reference) agrees too
    own_full = sweep_kl(model, enc, rows, sites, configs, None, progress=False, prefix_cache=False, batch_size=4)
    for name in configs:
        np.testing.assert_allclose(own_full[name], full[name], rtol=1e-6, atol=1e-9)


def test_layer_patch_recolours_with_train_rows_only(world):
    """The RQ1 layer patch's recolour statistics are the train rows' moments; val rows never enter them."""
    tok, base, enc = world
    tuned = copy.deepcopy(base)
    plant_edit(tuned, layer=LAYER, kind="attn_out", rank=2, scale=2.0, seed=3)
    sites = [Site(LAYER, "resid_post"), Site(3, "resid_post")]
    A, A_logits = _collect(base, tok, enc, sites)
    B, B_logits = _collect(tuned, tok, enc, sites)
    train, val = np.arange(N_TRAIN), np.arange(N_TRAIN, N_PROMPTS)
    st = layer_recolour_stats(_MemStore(A), _MemStore(B), sites, train)
    for s in sites:
        np.testing.assert_allclose(st[s.name]["mu_b"], np.mean(A[s.name][train], axis=0), rtol=1e-12)
        np.testing.assert_allclose(st[s.name]["sd_b"], np.std(A[s.name][train], axis=0), rtol=1e-12)
        np.testing.assert_allclose(st[s.name]["mu_t"], np.mean(B[s.name][train], axis=0), rtol=1e-12)
        np.testing.assert_allclose(st[s.name]["sd_t"], np.std(B[s.name][train], axis=0), rtol=1e-12)
        # the all-rows moments (the earlier, leaking definition) are measurably different
        assert np.abs(np.mean(B[s.name], axis=0) - st[s.name]["mu_t"]).max() > 1e-4
    # changing the val rows (the rows a layer patch evaluates) leaves the statistics unchanged
    A2 = {k: v.copy() for k, v in A.items()}
    B2 = {k: v.copy() for k, v in B.items()}
    for k in A2:
        A2[k][val] += 5.0
        B2[k][val] *= 3.0
    st2 = layer_recolour_stats(_MemStore(A2), _MemStore(B2), sites, train)
    for s in sites:
        for key in ("mu_b", "sd_b", "mu_t", "sd_t"):
            np.testing.assert_array_equal(st2[s.name][key], st[s.name][key])
    # the store-level entry point evaluates val rows with exactly those train-only statistics
    rows = val[:12]
    got = layer_patch_direction(tuned, enc, _MemStore(A, A_logits), _MemStore(B, B_logits), sites, rows, train,
                                progress=False)
    ref = reference_logits(tuned, enc, rows)
    want = {}
    for s in sites:
        x = A[s.name][rows]
        mu_b, sd_b = A[s.name][train].mean(0), A[s.name][train].std(0)
        mu_t, sd_t = B[s.name][train].mean(0), B[s.name][train].std(0)
        want[s.name] = (x - mu_b) / sd_b * sd_t + mu_t
    ref_kl = sweep_kl(tuned, enc, rows, sites, want, ref, progress=False)
    # the direction takes its reference from the one-token forwards themselves: equal up to float rounding
    src_top = A_logits[rows].argmax(1)
    np.testing.assert_array_equal(got.agree, ref.argmax(1) == src_top)  # dst unpatched, full forwards
    for s in sites:
        np.testing.assert_allclose(got.kl[s.name], ref_kl[s.name], rtol=1e-4, atol=1e-7)
        # the decision side against full forwards with the same vectors (numpy argmax)
        full = patched_logits(tuned, enc, rows, s, want[s.name], prefix_cache=False)
        np.testing.assert_array_equal(got.top1[s.name], full.argmax(1) == src_top)
    rows_t, dec = layer_patch_decisions({"base_into_tuned": got})
    dec = dec["base_into_tuned"]
    moved = ~got.agree
    assert moved.any()  # the planted edit changes some decisions
    for r, s in zip(rows_t, sites):
        assert r["top1_base_into_tuned"] == pytest.approx(got.top1[s.name].mean())
        assert r["flip_base_into_tuned"] == pytest.approx(got.top1[s.name][moved].mean())
        assert dec["flip"][f"L{s.layer}"] == pytest.approx(r["flip_base_into_tuned"])
    assert dec["agree_before"] == pytest.approx(got.agree.mean()) and dec["n_differ"] == int(moved.sum())
    assert layer_patch_table({"base_into_tuned": got})[0] == layer_patch_table({"base_into_tuned": got.kl})[0]
    # a model patched with its own vectors (src = dst): every decision stays, so every decision is "src's"
    own = layer_patch_direction(tuned, enc, _MemStore(B, B_logits), _MemStore(B, B_logits), sites, rows, train,
                                progress=False)
    assert own.agree.all() and all(own.top1[s.name].all() for s in sites)
    assert layer_patch_decisions({"d": own})[1]["d"]["flip"] == {"L2": None, "L3": None}


def test_src_decisions_map_through_the_shared_vocabulary():
    logits = np.array([[0.0, 5.0, 1.0, 9.0], [3.0, 0.0, 2.0, 1.0]])
    # token 3 is not shared: the decision is the argmax over the shared ids 0-2
    np.testing.assert_array_equal(decisions(logits, [0, 1, 2]), [1, 0])
    np.testing.assert_array_equal(decisions(logits), [3, 0])
    # shared ids aligned string by string: src id 1 is dst id 7, src 0 is dst 5 (ids or a boolean mask)
    np.testing.assert_array_equal(src_decisions_in_dst(logits, [0, 1, 2], [5, 7, 6]), [7, 5])
    np.testing.assert_array_equal(src_decisions_in_dst(logits, np.array([1, 1, 1, 0], bool), [5, 7, 6]), [7, 5])
    np.testing.assert_array_equal(src_decisions_in_dst(logits), [3, 0])
    with pytest.raises(MechdiffError, match="of both models"):
        src_decisions_in_dst(logits, [0, 1, 2], None)
    # src's whole vocabulary is shared: the same tokens under other ids (a permutation) ...
    np.testing.assert_array_equal(src_decisions_in_dst(logits, [3, 2, 1, 0], [0, 1, 2, 3]), [0, 3])
    # ... or dst has tokens of its own (a tuned tokenizer that adds words): src id j is still dst id allowed_dst[j]
    np.testing.assert_array_equal(src_decisions_in_dst(logits, [0, 1, 2, 3], [4, 0, 2, 1]), [1, 4])
    # torch ids and a dst boolean mask (its True positions in id order) give the same
    np.testing.assert_array_equal(
        src_decisions_in_dst(logits, torch.tensor([0, 1, 2]), np.array([0, 1, 0, 1, 1, 0], bool)), [3, 1])
    np.testing.assert_array_equal(src_decisions_in_dst(logits, torch.tensor([3, 2, 1, 0]), torch.arange(4)), [0, 3])


def test_layer_patch_table():
    res = {"base_into_tuned": {"L1.resid_post": np.array([1.0, 3.0]), "L0.resid_post": np.array([0.5, 0.5])},
           "tuned_into_base": {"L0.resid_post": np.array([2.0, 0.0]), "L1.resid_post": np.array([4.0, 6.0])}}
    rows, metrics = layer_patch_table(res)
    assert rows == [{"layer": 0, "kl_base_into_tuned": 0.5, "kl_tuned_into_base": 1.0},
                    {"layer": 1, "kl_base_into_tuned": 2.0, "kl_tuned_into_base": 5.0}]
    assert metrics == {"base_into_tuned": {"L1": 2.0, "L0": 0.5}, "tuned_into_base": {"L0": 1.0, "L1": 5.0}}


def test_kl_drop_min_k_and_errors(world):
    rng = np.random.default_rng(0)
    raw = rng.exponential(size=200) + 0.5
    mapped = 0.25 * raw
    d = kl_drop(raw, mapped, n_boot=300)
    assert d["drop_pct"] == pytest.approx(75.0)
    assert d["ci_low"] == pytest.approx(75.0) and d["ci_high"] == pytest.approx(75.0)
    noisy = kl_drop(raw, mapped * rng.uniform(0.5, 1.5, size=200), n_boot=300)
    assert noisy["ci_low"] < noisy["drop_pct"] < noisy["ci_high"]
    assert min_k([1, 2, 4, 8], [10.0, 50.0, 91.0, 95.0], 90.0) == 4
    assert min_k([1, 2], [10.0, 50.0], 90.0) is None
    # saturation: the best drop is 80 (k = 8), 90 % of it is 72 -> k = 4; full rank fitting noise does not matter
    assert saturation_k([0, 1, 2, 4, 8, 64], [0.0, 30.0, 60.0, 75.0, 80.0, 40.0], 0.9) == 4
    assert saturation_k([0, 1, 2], [0.0, 30.0, 60.0], 1.0) == 2
    assert saturation_k([0, 1, 2], [0.0, float("nan"), 61.0], 0.5) == 2  # undefined drops never count
    assert saturation_k([0, 1], [0.0, -3.0], 0.9) is None  # nothing to saturate
    with pytest.raises(MechdiffError):
        saturation_k([0, 1], [0.0, 5.0], 0.0)
    with pytest.raises(MechdiffError):
        kl_drop(raw, mapped[:10])
    tok, model, enc = world
    with pytest.raises(MechdiffError):
        patched_logits(model, enc, [0, 1], Site(1, "attn_out"), np.zeros((3, D)))
    with pytest.raises(MechdiffError):
        patched_logits(model, enc, [0, 1], Site(1, "attn_out"), np.full((2, D), np.nan))
    with pytest.raises(MechdiffError):
        patched_logits(model, enc, [], Site(1, "attn_out"), None)


def test_prefix_cache_path_raises_no_deprecation_warning(world):
    """The prefix-cache patch path calls transformers with its current cache argument: no Future/Deprecation warning."""
    tok, model, enc = world
    rows = np.arange(6)
    site = Site(1, "attn_out")
    vec = np.random.default_rng(0).normal(size=(len(rows), D)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to full forwards would warn: it must not
        fast = patched_logits(model, enc, rows, site, vec, prefix_cache=True)
    full = patched_logits(model, enc, rows, site, vec, prefix_cache=False)
    np.testing.assert_allclose(fast, full, rtol=1e-4, atol=1e-4)


def test_summarise_sweep_planted_drops():
    """Mapped KLs planted as fixed fractions of the raw KL: drops, min_k, full rank, per-dataset and alpha rows."""
    from mechdiff.analysis.patching import summarise_sweep

    raw = np.random.default_rng(0).exponential(size=40) + 0.2
    frac = {0: 1.0, 2: 0.6, 4: 0.3, "full": 0.1}
    kls = {"raw": raw}
    for k, f in frac.items():
        kls[f"k={k}|a=auto"] = f * raw
        kls[f"k={k}|a=0.5"] = min(1.0, 2 * f) * raw
    ds = ["a"] * 20 + ["b"] * 19 + ["c"]
    rank_rows, alpha_rows, m = summarise_sweep(kls, site="L1.attn_out", width=64, ranks=[0, 2, 4, "full"],
                                               alphas=["auto", 0.5], rank=4, alpha="auto", target_drop=50.0,
                                               datasets=ds, n_boot=50)
    assert [r["k"] for r in rank_rows] == [0, 2, 4, 64]
    np.testing.assert_allclose([r["kl_drop"] for r in rank_rows], [0.0, 40.0, 70.0, 90.0], atol=1e-9)
    assert m["min_k"] == 4 and m["kl_drop"] == pytest.approx(70.0) and m["kl_drop_full"] == pytest.approx(90.0)
    assert m["kl_raw"] == pytest.approx(raw.mean()) and m["kl_mapped"] == pytest.approx(0.3 * raw.mean())
    assert m["kl_drop_a"] == pytest.approx(70.0) and m["kl_drop_b"] == pytest.approx(70.0)
    # the paired difference in nats: mean(raw - mapped) = 0.7 mean(raw), its CI a percentile bootstrap over prompts
    assert m["kl_diff"] == pytest.approx(0.7 * raw.mean())
    boot = [0.7 * raw[i].mean() for i in np.random.default_rng(5).integers(0, raw.size, (4000, raw.size))]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert m["kl_diff_ci_low"] == pytest.approx(lo, rel=0.1) and m["kl_diff_ci_high"] == pytest.approx(hi, rel=0.1)
    assert m["kl_diff_ci_low"] < m["kl_diff"] < m["kl_diff_ci_high"]
    assert "kl_drop_c" not in m  # a dataset with < 2 prompts gets no drop
    half = {r["k"]: r["kl_drop"] for r in alpha_rows if r["alpha"] == "0.5"}
    assert half[4] == pytest.approx(40.0) and half[0] == pytest.approx(0.0)
    none = summarise_sweep(kls, site="s", width=64, ranks=[0, 2], alphas=["auto"], rank=2, alpha="auto",
                           target_drop=95.0, n_boot=20)[2]
    assert none["min_k"] == -1
    # a rank beyond the width keeps every direction: it is the full map (k = width), whose drop kl_drop_full reports
    wide = summarise_sweep(kls, site="s", width=3, ranks=[0, 2, 4], alphas=["auto"], rank=2, alpha="auto",
                           target_drop=50.0, n_boot=20)
    assert [r["k"] for r in wide[0]] == [0, 2, 3] and [r["k_label"] for r in wide[0]] == ["0", "2", "4"]
    assert wide[2]["kl_drop_full"] == pytest.approx(70.0) and wide[2]["k_saturated"] == 3


def test_rank_alpha_configs_are_the_map_at_each_rank_and_alpha():
    from mechdiff.analysis.patching import rank_alpha_configs

    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 8))
    Y = X @ (np.eye(8) + 0.3 * rng.normal(size=(8, 8))) + 1.0
    m = fit_map(X, Y).with_alpha(1.7)
    cfg = rank_alpha_configs(m, X[:5], [0, 2, "full"], ["auto", 0.5])
    assert list(cfg) == ["raw", "k=0|a=auto", "k=0|a=0.5", "k=2|a=auto", "k=2|a=0.5", "k=full|a=auto", "k=full|a=0.5"]
    np.testing.assert_allclose(cfg["raw"], recolour(X[:5], m.stats))
    np.testing.assert_allclose(cfg["k=2|a=auto"], 1.7 * (X[:5] @ m.at_rank(2).W + m.at_rank(2).b / 1.0))
    np.testing.assert_allclose(cfg["k=full|a=0.5"], 0.5 * (X[:5] @ m.W + m.b))


def test_prefix_cache_runs_in_bf16_and_its_self_check_catches_a_wrong_position(world, monkeypatch):
    """A bf16 model keeps the prefix-cache path (its self-check allows bf16 rounding, 2 x eps relative, not a
    fallback to full forwards) and agrees with bf16 full forwards; a decode one position off fails the check."""
    import mechdiff.analysis.patching as PT

    tok, model, enc = world
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    site, rows = Site(LAYER, "attn_out"), np.arange(10, 40)
    vec = np.random.default_rng(2).normal(size=(len(rows), D))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        fast = patched_logits(m16, enc, rows, site, vec, prefix_cache=True, batch_size=8)
    full = patched_logits(m16, enc, rows, site, vec, prefix_cache=False, batch_size=8)
    rel = np.linalg.norm(fast - full) / np.linalg.norm(full)
    assert rel < 2 * torch.finfo(torch.bfloat16).eps
    # the rule itself: float32 allows 1e-3 relative, bf16 2 x 2^-7; an error of 5 % fails both
    want = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    noisy = want + 0.05 * want.norm() / want.numel() ** 0.5 * torch.randn(16, 50)
    for dt, tol in ((torch.float32, 1e-3), (torch.bfloat16, 2 * 2.0**-7)):
        err, t = cache_check(noisy, want, dt)
        assert t == pytest.approx(tol) and err == pytest.approx(0.05, rel=0.1) and err > t
        assert cache_check(want, want, dt)[0] == 0.0
    orig = PT._decode

    def off_by_one(model_, body, ctx, bsel, plan, upto=0, kept=None):
        kv, t, p, P = ctx
        return orig(model_, body, (kv, t, p + 1, P), bsel, plan, upto, kept)

    monkeypatch.setattr(PT, "_decode", off_by_one)
    with pytest.warns(RuntimeWarning, match="prefix-cache patching unavailable"):
        again = patched_logits(m16, enc, rows, site, vec, prefix_cache=True, batch_size=8)
    np.testing.assert_array_equal(again, full)  # the fallback is the full-forward path


def test_head_blend_splits_through_pinv_and_patches_only_the_chosen_heads(world):
    """Known answer: a change planted in one head's queries at the last layer (the output projection untouched).
    Its per-head parts through pinv(W_o) are the base model's for the planted head and equal elsewhere, so
    patching the base vector through that head alone gives the base model's output, the other heads change
    nothing, and all heads together equal the vector patch (W_o square and invertible here)."""
    from mechdiff.analysis.patching import head_blend
    from mechdiff.model.sites import attention_heads

    tok, base, enc = world
    tuned = copy.deepcopy(base)
    last, H, hd = 3, 4, 16
    attn = tuned.model.layers[last].self_attn
    with torch.no_grad():
        attn.q_proj.weight[2 * hd : 3 * hd] *= -3.0  # head 2's queries only
    site = Site(last, "attn_out")
    rows = np.arange(40)
    a_base, lg_base = _collect(base, tok, enc, [site])
    a_tuned, lg_tuned = _collect(tuned, tok, enc, [site])
    vb, vt = a_base[site.name][rows], a_tuned[site.name][rows]
    heads = attention_heads(tuned)
    W = heads.matrix(last).detach().double().numpy()
    # independent reference of the per-head parts: numpy's pinv
    z_b, z_t = vb @ np.linalg.pinv(W).T, vt @ np.linalg.pinv(W).T
    diff = np.abs(z_b - z_t).reshape(len(rows), H, hd).max(axis=(0, 2))
    assert diff[2] > 0.1 and max(diff[[0, 1, 3]]) < 1e-4  # only the planted head's part differs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # heads exactly as wide as the stream: a subset's split is unique
        blend2 = head_blend(heads, last, vt, [2])
    assert blend2.identified
    only2 = blend2(vb)
    want = (np.where(np.repeat(np.arange(H), hd) == 2, z_b, z_t)) @ W.T
    np.testing.assert_allclose(only2, want, atol=1e-5)
    kl = {name: patch_kl(tuned, enc, rows, site, v, lg_base[rows]) for name, v in
          (("head2", only2), ("others", head_blend(heads, last, vt, [0, 1, 3])(vb)),
           ("all", head_blend(heads, last, vt, "all")(vb)), ("vector", vb), ("none", None))}
    assert kl["none"].mean() > 5e-4  # the planted head moves the output
    for name in ("head2", "all", "vector"):  # the base output, to float rounding
        assert kl[name].mean() < 1e-3 * kl["none"].mean(), name
    np.testing.assert_allclose(kl["others"], kl["none"], rtol=1e-3, atol=1e-7)  # the other heads carry nothing
    np.testing.assert_allclose(head_blend(heads, last, vt, "all")(vb), vb, atol=1e-4)
    with pytest.raises(MechdiffError, match="4 heads"):
        head_blend(heads, last, vt, [4])


def test_head_blend_drops_the_ill_conditioned_directions_of_w_o():
    """An output projection with one tiny singular value: the exact pseudo-inverse would split a difference
    along it into per-head parts 1e6 times larger; the truncated one leaves that direction unpatched."""
    from torch import nn

    from mechdiff.analysis.patching import head_blend
    from mechdiff.model.sites import Heads

    rng = np.random.default_rng(0)
    d = 8
    U, _ = np.linalg.qr(rng.normal(size=(d, d)))
    V, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sv = np.array([3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 0.8, 1e-6])
    proj = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.from_numpy(U @ np.diag(sv) @ V.T))
    heads = Heads(2, 4, (proj,))
    c = rng.normal(size=(5, d))
    v = c + 0.1 * U[:, -1]  # the difference lies along the tiny singular direction only
    b = head_blend(heads, 0, c, [0])
    assert b.rank == 7
    np.testing.assert_allclose(b(v), c, atol=1e-5)  # that direction is dropped: the patch changes nothing
    w = c + 0.1 * U[:, 0]  # along a well-conditioned direction every head's share comes through
    both = head_blend(heads, 0, c, "all")(w)
    np.testing.assert_allclose(both, w, atol=1e-5)
    h0 = head_blend(heads, 0, c, [0])(w) - c
    Wn = proj.weight.detach().double().numpy()
    z = 0.1 * U[:, 0] @ np.linalg.pinv(Wn, rcond=1e-3).T  # numpy's truncated split
    np.testing.assert_allclose(h0, np.tile(np.where(np.arange(d) < 4, z, 0) @ Wn.T, (5, 1)), atol=1e-6)


@pytest.mark.parametrize("window", [8, 40])
def test_prefix_cache_under_a_sliding_window_equals_one_prompt_at_a_time(window):
    """A sliding-window model (Mistral's layout) patched through the default prefix-cache path gives each prompt's
    own unpadded forward with the same patch. The first batch (the shortest prompts, 5 tokens) fits an 8-token
    window and later ones (12-21 tokens) do not, which a check of the first batch alone would miss: the run
    falls back to full forwards with a warning naming the window. A 40-token window holds every prompt and keeps
    the cache path (no warning)."""
    from transformers import MistralConfig, MistralForCausalLM

    from mechdiff.model.tokens import Encoded

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                                             max_position_embeddings=128)).eval()
    rng = np.random.default_rng(0)
    lengths = [5, 5, 5, 5, 12, 15, 18, 21]
    enc = Encoded([rng.integers(1, 64, size=n).tolist() for n in lengths], [n - 1 for n in lengths], pad=0)
    rows = np.arange(len(lengths))
    site = Site(1, "attn_out")
    vec = rng.normal(size=(len(rows), 32)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = patched_logits(model, enc, rows, site, vec, batch_size=4)
    one = np.concatenate([patched_logits(model, enc, [r], site, vec[[r]], batch_size=1, prefix_cache=False)
                          for r in rows])
    np.testing.assert_allclose(got, one, atol=1e-5)
    fallback = [str(w.message) for w in caught if "using full forwards" in str(w.message)]
    assert (len(fallback) == 1 and "sliding attention window (8 tokens)" in fallback[0]) if window == 8 \
        else not fallback


def test_a_later_batch_the_cache_gets_wrong_sends_the_run_to_full_forwards(monkeypatch):
    """The per-batch safeguards of prefix-cache patching, with the window rule switched off: the first batch (5
    tokens) fits the 8-token window, a later one does not; its cache keeps fewer positions than the batch
    (transformers keeps window - 1), so the whole run falls back to full forwards with a warning saying so, and
    the logits are each prompt's own. With that check off too, the batch's own full forward catches it."""
    import mechdiff.analysis.patching as patching
    from mechdiff.model.tokens import Encoded

    torch.manual_seed(0)
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                             max_position_embeddings=128)).eval()
    rng = np.random.default_rng(0)
    lengths = [5, 5, 5, 5, 12, 15, 18, 21]
    enc = Encoded([rng.integers(1, 64, size=n).tolist() for n in lengths], [n - 1 for n in lengths], pad=0)
    rows, site = np.arange(len(lengths)), Site(1, "attn_out")
    vec = rng.normal(size=(len(rows), 32)).astype(np.float32)
    one = np.concatenate([patched_logits(model, enc, [r], site, vec[[r]], batch_size=1, prefix_cache=False)
                          for r in rows])
    monkeypatch.setattr(patching, "fits_window", lambda model, slots: True)
    with pytest.warns(RuntimeWarning, match="its cache keeps 7 of a batch's"):
        got = patched_logits(model, enc, rows, site, vec, batch_size=4)
    np.testing.assert_allclose(got, one, atol=1e-5)
    real_kv = patching.cache_kv

    def padded_kv(cache):  # a cache that claims every position: the kept slots, zeros in front of them
        T = cache.get_seq_length()
        return [(torch.nn.functional.pad(k, (0, 0, T - k.shape[-2], 0)),
                 torch.nn.functional.pad(v, (0, 0, T - v.shape[-2], 0))) for k, v in real_kv(cache)]

    monkeypatch.setattr(patching, "cache_kv", padded_kv)
    with pytest.warns(RuntimeWarning, match="prefix-cache logits differ from a full forward"):
        got = patched_logits(model, enc, rows, site, vec, batch_size=4)
    np.testing.assert_allclose(got, one, atol=1e-5)


def test_sliding_window_is_read_from_the_config():
    """`cache.sliding_window`: the window of models that attend through one, None for those that do not (a Qwen2
    config carries a window but uses it only with `use_sliding_window`, and only in layers from
    `max_window_layers` on)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from mechdiff.model.cache import fits_window, sliding_window

    small = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, head_dim=8, sliding_window=10))
    assert sliding_window(gemma) == 10 and fits_window(gemma, 8) and not fits_window(gemma, 9)
    assert sliding_window(LlamaForCausalLM(LlamaConfig(**small))) is None
    assert sliding_window(Qwen2ForCausalLM(Qwen2Config(**small, sliding_window=10, use_sliding_window=False))) is None
    assert sliding_window(Qwen2ForCausalLM(Qwen2Config(**small, sliding_window=10, use_sliding_window=True))) is None
    assert sliding_window(Qwen2ForCausalLM(Qwen2Config(**small, sliding_window=10, use_sliding_window=True,
                                                       max_window_layers=1))) == 10


def test_head_blend_warns_where_heads_are_wider_than_the_stream():
    """Heads whose concatenated outputs are wider than the residual stream (Gemma's layout: 5 x 10 over d = 32)
    have no unique per-head split of an attn_out difference: a change planted in head 2's queries alone is
    partly taken by the other heads' pinv parts (their patch moves the output toward the base model's by a
    visible share of the gap), so a subset is warned about and flagged, while `all` is not."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from mechdiff.analysis.patching import head_blend
    from mechdiff.model.sites import attention_heads
    from mechdiff.model.tokens import Encoded

    torch.manual_seed(0)
    base = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=5, num_key_value_heads=1, head_dim=10)).eval()
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight[20:30] *= -3.0  # head 2's queries only
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 64, size=int(n)).tolist() for n in rng.integers(4, 12, size=30)]
    enc = Encoded(ids, [len(x) - 1 for x in ids], pad=0)
    rows, site = np.arange(30), Site(1, "attn_out")

    def last(model):
        return np.stack([capture(model, torch.tensor([s]), None, [site])[0][site.name][0, -1].double().numpy()
                         for s in ids])

    vb, vt = last(base), last(tuned)
    heads = attention_heads(tuned)
    ref = reference_logits(base, enc, rows)
    gap = patch_kl(tuned, enc, rows, site, None, ref).mean()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        others = head_blend(heads, 1, vt, [0, 1, 3, 4])
    assert not others.identified and any("wider than the residual stream" in str(w.message) for w in caught)
    with pytest.warns(RuntimeWarning, match="wider than the residual stream"):
        assert not head_blend(heads, 1, vt, [0, 0, 1, 2, 3]).identified  # a repeated head is not all five
    moved = 1 - patch_kl(tuned, enc, rows, site, others(vb), ref).mean() / gap
    assert moved > 0.1  # the unchanged heads' parts carry part of head 2's change: why the subset is flagged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        every = head_blend(heads, 1, vt, "all")
    assert every.identified and patch_kl(tuned, enc, rows, site, every(vb), ref).mean() < 1e-6 * gap + 1e-12


def test_the_reported_rank_beyond_the_width_is_refused_before_any_forward():
    """`mechdiff params --check` refuses such a rank; `dvc exp run -S rank=...` skips that check, so the stage's
    sweep refuses it too (sweep ranks beyond the width stay allowed: they mean the full map)."""
    X = np.zeros((3, 16))
    with pytest.raises(MechdiffError, match=r"^rank 17: more directions than L1\.attn_out's width 16: use a k <= 16"):
        rank_alpha_sweep(None, None, [0, 1, 2], Site(1, "attn_out"), None, X, ranks=[1, 64], alphas=["auto"],
                         rank=17, alpha="auto", target_drop=50)
