"""Steering sweeps: a planted last-layer edit is ablated and reproduced through the sweep, alpha/k choice rules."""

import copy

import numpy as np
import pytest
import torch

from mechdiff.analysis.behaviour import greedy_continuations
from mechdiff.analysis.steer_eval import (
    choose,
    directions_for,
    evaluate,
    gap_share,
    group_handles,
    kl_share,
    make_arms,
    site_group,
    sweep,
)
from mechdiff.analysis.steering import collect_decision_acts, fit_handle, intervention
from mechdiff.errors import MechdiffError
from mechdiff.model.recipes import plant_edit
from mechdiff.model.sites import Site
from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer
from mechdiff.model.tokens import encode
from tests.analysis.conftest import WORDS, random_texts

SITE = Site(3, "attn_out")  # last block: the decision token's output depends on the edit only there


@pytest.fixture(scope="module")
def world():
    texts = random_texts(120, hi=10)
    tok = make_tiny_tokenizer(texts, extra_words=WORDS)
    base = make_tiny_model(len(tok), n_layers=4, d_model=32, seed=0)
    tuned = copy.deepcopy(base)
    info = plant_edit(tuned, layer=3, kind="attn_out", rank=2, scale=6.0, seed=1)
    encs = {w: encode(tok, texts) for w in ("base", "tuned")}
    rows = {"train_target": np.arange(0, 60), "train_control": np.arange(60, 80), "dev": np.arange(80, 92),
            "test": np.arange(92, 108), "neutral_dev": np.arange(108, 114), "neutral_test": np.arange(114, 120)}
    # the behaviour: the tuned model's most common first greedy word
    first = [t.split()[0] if t.split() else "" for t in
             greedy_continuations(tuned, tok, encs["tuned"], rows["test"], max_new_tokens=1)]
    marker = max(set(first), key=first.count)
    mc = (["the cat sat on the", "a bird flew over the"], [["mat", "sun"], ["tree", "river"]], [0, 1])
    neutral = {sp: [texts[i] for i in rows[f"neutral_{sp}"]] for sp in ("dev", "test")}
    arms = make_arms({"base": (base, tok), "tuned": (tuned, tok)}, encs, rows, neutral, {"dev": mc, "test": mc},
                     [rf"^\s*{marker}\b"], allowed={"base": None, "tuned": None}, chat=True, max_len=64,
                     max_new_tokens=2, batch_size=8)
    fit = np.concatenate([rows["train_target"], rows["train_control"]])
    acts = {w: collect_decision_acts(m, encs[w], fit, [SITE])[SITE.name] for w, m in (("base", base), ("tuned", tuned))}
    return arms, acts, info, texts


def _handles(acts, k):
    V = directions_for("delta", k, SITE, acts["tuned"] - acts["base"], n_target=60, groups=["g"] * 60)
    return {"steer": [fit_handle(SITE, V, acts["base"], acts["tuned"])],
            "ablate": [fit_handle(SITE, V, acts["tuned"], acts["base"])]}


def test_planted_edit_is_reproduced_and_ablated_at_rank_r(world):
    arms, acts, info, _ = world
    h = _handles(acts, 2)
    for op, arm in arms.items():
        res = evaluate(arm, intervention(h[op], 1.0), n_boot=50)
        assert res["kl_test"][0] >= 0.95, (op, res["kl_test"])
        assert res["effect_test"][0] == pytest.approx(1.0, abs=0.15), (op, res["effect_test"])
        none = evaluate(arm, intervention(h[op], 0.0), splits=("test",), side="test")
        assert abs(none["kl_test"]) < 1e-6 and abs(none["ppl_change"]) < 1e-6 and none["mc_drop"] == 0.0
        assert abs(none["kl_neutral"]) < 1e-9


def test_sweep_min_k_is_the_planted_rank(world):
    arms, acts, _, _ = world
    rows = sweep(arms, lambda k: _handles(acts, k), [1, 2, 3], [0.5, 1.0], ppl_budget=10.0, mc_budget=1.0)
    assert len(rows) == 3 * 2 * 2
    for op in ("steer", "ablate"):
        best, mk, chosen = choose([{**r, "effect_test": r["kl_test"]} for r in rows], op, target=0.95)
        assert mk == 2 and chosen == 2, (op, mk, [(r["k"], r["alpha"], r["kl_test"]) for r in best])
        assert {r["alpha"] for r in best if r["k"] >= 2} == {1.0}


def test_choose_rules():
    def row(k, a, dev, test, ok=True):
        return {"op": "steer", "k": k, "alpha": a, "effect_dev": dev, "effect_test": test, "within_budget": ok}

    rows = [row(1, 0.5, 0.2, 0.2), row(1, 1.0, 0.5, 0.5), row(1, 2.0, 0.9, 0.9, ok=False),
            row(2, 0.5, 0.6, 0.6), row(2, 1.0, 0.85, 0.82), row(4, 1.0, 0.95, 0.9)]
    best, mk, chosen = choose(rows, "steer", target=0.8)
    assert [(r["k"], r["alpha"]) for r in best] == [(1, 1.0), (2, 1.0), (4, 1.0)]  # over-budget alpha never chosen
    assert mk == 2 and chosen == 2
    assert choose(rows, "steer", target=0.8, k=4)[2] == 4
    assert choose(rows, "steer", target=0.99)[1:] == (None, 4)
    with pytest.raises(MechdiffError, match="steer.k"):
        choose(rows, "steer", target=0.8, k=3)


def test_shares_and_site_groups():
    own, goal = np.zeros(4), np.ones(4)
    assert gap_share(own, goal, np.array([1, 1, 0, 0.0])) == pytest.approx(0.5)
    assert np.isnan(gap_share(own, own, goal))
    assert kl_share(np.array([2.0, 2.0]), np.array([0.5, 0.5])) == pytest.approx(0.75)
    assert site_group("L3.resid_post", []) == [Site(3, "resid_post")]
    assert site_group("layers", [1, 2]) == [Site(1, "attn_out"), Site(1, "mlp_out"), Site(2, "attn_out"),
                                            Site(2, "mlp_out")]
    with pytest.raises(MechdiffError, match="steer.layers"):
        site_group("layers", [])
    with pytest.raises(MechdiffError, match="transport.sites"):
        directions_for("transport", 1, Site(1), np.ones((4, 3)), n_target=2, groups=["a", "b"])


def test_sae_source_picks_the_latents_most_active_on_the_target_change():
    import torch

    from mechdiff.analysis.transport import principal_cosines
    from mechdiff.sae.model import TopKSAE

    d, width = 16, 40
    sae = TopKSAE(d, width, 4, seed=3)
    rng = np.random.default_rng(0)
    dirs = sae.dec.detach().double().numpy()  # (width, d): latent j's decoder direction
    planted = [7, 21]
    tgt = 3.0 * (dirs[planted[0]] + dirs[planted[1]]) + 0.05 * rng.normal(size=(50, d))
    ctl = 0.05 * rng.normal(size=(50, d))
    with torch.no_grad():
        z = sae.encode(torch.as_tensor(tgt, dtype=torch.float32)).mean(0) - \
            sae.encode(torch.as_tensor(ctl, dtype=torch.float32)).mean(0)
    top = set(torch.topk(z, 2).indices.tolist())
    V = directions_for("sae", 2, Site(1), np.vstack([tgt, ctl]), n_target=50, groups=["g"] * 50,
                       extra={"saes": {"L1.resid_post": sae}})
    assert V.shape == (d, 2)
    assert principal_cosines(V, dirs[sorted(top)].T).min() > 1 - 1e-9
    with pytest.raises(MechdiffError, match="sae.layers"):
        directions_for("sae", 1, Site(2), np.ones((4, d)), n_target=2, groups=["a", "b"])


def test_conditional_gate_keeps_the_effect_and_removes_side_effects(world):
    """A probe that accepts the target prompts only: the effect stays, neutral prompts are left untouched."""
    from mechdiff.analysis.steer_eval import conditional

    arms, acts, _, _ = world
    arm = arms["steer"]
    h = _handles(acts, 2)["steer"]
    gate_site = Site(3, "resid_pre")
    test_rows = np.concatenate([arm.rows["test"], arm.neutral["test"].rows])
    X = collect_decision_acts(arm.model, arm.enc, test_rows, [gate_site])[gate_site.name]
    n_t = len(arm.rows["test"])
    # the gate is fitted on these very rows here, so it separates them perfectly (the stage fits it on train)
    res = conditional(arm, h, 1.0, gate_site, X[:n_t], X[n_t:], seed=0)
    assert res["gate_train_accuracy"] >= 0.9  # random texts on both sides: nearly, not always, separable
    assert res["gated"]["kl"] >= 0.8 * res["ungated"]["kl"]
    assert res["ungated"]["kl_neutral"] > 1e-4
    assert res["gated"]["kl_neutral"] <= 0.5 * res["ungated"]["kl_neutral"]
    assert abs(res["gated"]["ppl_change"]) <= abs(res["ungated"]["ppl_change"]) + 1e-9


def test_accuracy_measure_and_correct_split_on_planted_answers(world):
    """Reference answers planted as the tuned model's own continuations: `correct_split` finds exactly the rows
    given them, `make_arms(answers=...)` scores the tuned model's accuracy 1 and the base's lower, and the rank-2
    handles of the planted edit close the accuracy gap (steer: the base gives the tuned answers; ablate: the
    tuned model loses them)."""
    from mechdiff.analysis.steer_eval import correct_split

    arms, acts, _, texts = world
    base, tuned = arms["steer"], arms["ablate"]
    tok = tuned.tokenizer
    n = len(texts)
    said = dict(enumerate(greedy_continuations(tuned.model, tok, tuned.enc, np.arange(n), max_new_tokens=2)))
    usable = np.array([i for i in range(n) if said[i].strip()])
    # correct_split: a reference is the model's own answer on even rows, a word it never writes on odd rows
    pool = usable[usable < 80]
    refs = [said[i] if j % 2 == 0 else "zzqx" for j, i in enumerate(pool)]
    right, wrong = correct_split(tuned.model, tok, tuned.enc, pool, refs, max_new_tokens=2, batch_size=8)
    np.testing.assert_array_equal(right, pool[0::2])
    np.testing.assert_array_equal(wrong, pool[1::2])
    # the accuracy measure: references = the tuned model's answers on the dev / test rows
    answers = [said[i] if said[i].strip() else "zzqx" for i in range(n)]
    rows = {"train_target": np.arange(0, 60), "train_control": np.arange(60, 80), "dev": np.arange(80, 92),
            "test": np.arange(92, 108), "neutral_dev": np.arange(108, 114), "neutral_test": np.arange(114, 120)}
    mc = (["the cat sat on the", "a bird flew over the"], [["mat", "sun"], ["tree", "river"]], [0, 1])
    neutral = {sp: [texts[i] for i in rows[f"neutral_{sp}"]] for sp in ("dev", "test")}
    acc = make_arms({"base": (base.model, tok), "tuned": (tuned.model, tok)}, {"base": base.enc, "tuned": tuned.enc},
                    rows, neutral, {"dev": mc, "test": mc}, ["unused"], allowed={"base": None, "tuned": None},
                    chat=True, max_len=64, max_new_tokens=2, batch_size=8, answers=answers)
    has_answer = np.array([bool(said[i].strip()) for i in rows["test"]], dtype=float)
    np.testing.assert_array_equal(acc["ablate"].own_hits["test"], has_answer)  # right wherever it answered
    assert has_answer.mean() >= 0.9
    assert acc["steer"].own_hits["test"].mean() < 0.5  # the planted edit changes most answers: a gap to close
    h = _handles(acts, 2)
    for op in ("steer", "ablate"):
        res = evaluate(acc[op], intervention(h[op], 1.0), splits=("test",), side=None)
        assert res["effect_test"] >= 0.85, (op, res["effect_test"])


def test_group_handles_skip_unchanged_sites_and_make_either_ablation():
    """A configuration whose first site the change bypasses (identical activations) gets handles only at the
    changed site; `ablation` picks the fitted or the base-mean ablation; no changed site at all is an error."""
    rng = np.random.default_rng(0)
    n_t, n, d = 30, 80, 6
    same, moved = Site(1, "mlp_out"), Site(2, "attn_out")
    Xb = {same.name: rng.normal(size=(n, d)), moved.name: rng.normal(size=(n, d))}
    Xt = {same.name: Xb[same.name].copy(), moved.name: Xb[moved.name].copy()}
    Xt[moved.name][:n_t, 0] += 3.0  # the target prompts move along e0 at the second site only
    groups = [f"g{i % 3}" for i in range(n_t)]
    h = group_handles([same, moved], Xb, Xt, 1, source="dim", n_target=n_t, groups=groups)
    assert [x.site for x in h["steer"]] == [moved] and [x.site for x in h["ablate"]] == [moved]
    assert abs(h["steer"][0].V[0, 0]) > 0.99  # the direction of the planted change
    want = fit_handle(moved, h["steer"][0].V, Xt[moved.name], Xb[moved.name])
    np.testing.assert_array_equal(h["ablate"][0].A, want.A)
    m = group_handles([same, moved], Xb, Xt, 1, source="dim", n_target=n_t, groups=groups, ablation="mean")["ablate"][0]
    np.testing.assert_array_equal(m.A, -np.eye(1))
    np.testing.assert_allclose(m.b, Xb[moved.name].mean(0) @ m.V, rtol=0, atol=1e-12)
    with pytest.raises(MechdiffError, match="equals the base at every site"):
        group_handles([same], Xb, Xt, 1, source="dim", n_target=n_t, groups=groups)
    with pytest.raises(MechdiffError, match="steer.ablation"):
        group_handles([moved], Xb, Xt, 1, source="dim", n_target=n_t, groups=groups, ablation="zero")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layers_configuration_fits_each_handle_after_the_ones_upstream(arch):
    """Known answer for `layers` (attn_out and mlp_out of a block, one handle each): a rank-2 change planted in
    the last block's attention output, whose MLP then reads it. Steering the base's attention output already
    turns its MLP output into the tuned model's, so an MLP handle fitted on the unintervened activations adds
    that part a second time; fitted on the steered base (`refit`) it adds nothing more, and the configuration
    reproduces (steer) and removes (ablate) the change like the single attn_out handle does: KL share 1."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechdiff.analysis.behaviour import decision_logits
    from mechdiff.stats.kl import kl_divergence

    texts = random_texts(120, hi=12)
    tok = make_tiny_tokenizer(texts, extra_words=WORDS)
    if arch == "llama":
        base = make_tiny_model(len(tok), n_layers=4, d_model=32, seed=0)
    else:
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=4, n_head=4, n_positions=128)).eval()
    with torch.no_grad():  # larger weights: the MLP reacts visibly to the edit
        for p in base.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    tuned = copy.deepcopy(base)
    plant_edit(tuned, layer=3, kind="attn_out", rank=2, scale=6.0, seed=1)
    enc = encode(tok, texts)
    fit, test = np.arange(80), np.arange(80, 120)
    group = site_group("layers", [3])
    models = {"base": base, "tuned": tuned}
    acts = {w: collect_decision_acts(m, enc, fit, group) for w, m in models.items()}

    def refit(which, handles, site):
        return collect_decision_acts(models[which], enc, fit, [site], intervene=intervention(handles, 1.0))[site.name]

    lb, lt = decision_logits(base, enc, test), decision_logits(tuned, enc, test)
    gap_s, gap_a = kl_divergence(lt, lb).mean(), kl_divergence(lb, lt).mean()

    def shares(h):
        ls = decision_logits(base, enc, test, intervene=intervention(h["steer"], 1.0))
        la = decision_logits(tuned, enc, test, intervene=intervention(h["ablate"], 1.0))
        return 1 - kl_divergence(lt, ls).mean() / gap_s, 1 - kl_divergence(lb, la).mean() / gap_a

    for k in (2, 4):
        h = group_handles(group, acts["base"], acts["tuned"], k, source="delta", n_target=80, groups=["g"] * 80,
                          refit=refit)
        assert [x.site for x in h["steer"]] == group
        steer, ablate = shares(h)
        assert steer > 0.999 and ablate > 0.999, (k, steer, ablate)
    # the same handles fitted on the unintervened activations count the MLP's part twice
    twice = shares(group_handles(group, acts["base"], acts["tuned"], 2, source="delta", n_target=80,
                                 groups=["g"] * 80))
    assert min(twice) < 0.995, twice
