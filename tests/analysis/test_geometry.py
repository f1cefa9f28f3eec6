"""Concept geometry: whitening, the LDA estimator, orthogonality, controls, interventions and the pair comparison,
against closed forms and a planted hierarchy in a tiny model's unembedding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mechdiff.analysis.geometry import (
    Concept,
    ConceptSet,
    angle,
    compare_pair,
    concept_vector,
    hidden_direction,
    hidden_metric,
    hierarchy,
    hierarchy_angles,
    identity_deviation,
    model_geometry,
    orthogonality_verdict,
    polytope,
    polytope_summary,
    random_parent_draws,
    random_parent_vectors,
    set_shifts,
    target_leakage,
    unembedding,
    whitening,
)
from mechdiff.data.corpus import load_concepts, write_default_corpora
from mechdiff.errors import MechdiffError
from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer

PARENTS = {"fauna": ["cat", "dog", "owl", "emu", "yak", "eel", "ant", "bee", "ram", "hen", "elk", "koi"],
           "tools": ["saw", "axe", "awl", "hoe", "pin", "nut", "bolt", "rake", "file", "vise", "drill", "plane"],
           "foods": ["pie", "jam", "bun", "rice", "soup", "stew", "taco", "kale", "leek", "plum", "fig", "pear"]}


def planted_concepts() -> list[Concept]:
    parents, children = [], []
    for p, words in PARENTS.items():
        parents.append(Concept(p, None, list(words)))
        for j in range(3):
            children.append(Concept(f"{p}/c{j}", p, words[4 * j : 4 * j + 4]))
    return parents + children


def test_whitening_of_a_planted_covariance_is_the_identity():
    rng = np.random.default_rng(0)
    d = 12
    L = rng.normal(size=(d, d))
    cov = L @ L.T + 0.5 * np.eye(d)
    G = rng.multivariate_normal(rng.normal(size=d), cov, size=5000)
    wh = whitening(G)
    assert identity_deviation(wh.apply(G)) < 1e-10
    emp = np.cov(G, rowvar=False)
    np.testing.assert_allclose(wh.A @ emp @ wh.A, np.eye(d), atol=1e-10)
    np.testing.assert_allclose(wh.A_inv @ wh.A_inv, emp, rtol=1e-10, atol=1e-10)
    with pytest.raises(MechdiffError, match="singular"):
        whitening(np.concatenate([G[:, :3], G[:, :3]], axis=1))


def test_lda_estimator_matches_the_closed_form_on_gaussian_classes():
    rng = np.random.default_rng(1)
    d = 8
    L = rng.normal(size=(d, d))
    sigma = L @ L.T / d + 0.2 * np.eye(d)
    mu = rng.normal(size=d)
    G = rng.multivariate_normal(mu, sigma, size=20000)
    est = concept_vector(G, "lda")
    gh = np.linalg.solve(sigma, mu)
    gh /= np.linalg.norm(gh)
    closed = (gh @ mu) * gh
    assert np.linalg.norm(est - closed) / np.linalg.norm(closed) < 0.03
    np.testing.assert_allclose(concept_vector(G, "mean"), G.mean(0))


def test_hierarchy_angles_against_hand_numbers():
    vecs = {"p": np.array([1.0, 0.0, 0.0]), "p/a": np.array([1.0, 1.0, 0.0]), "p/b": np.array([2.0, 0.0, 1.0])}
    cs = [Concept("p", None, ["x"]), Concept("p/a", "p", ["x"]), Concept("p/b", "p", ["y"])]
    rows = {(r["kind"], r["child"]): r["angle"] for r in hierarchy_angles(vecs, cs)}
    assert rows["child", "p/a"] == pytest.approx(90.0)
    assert rows["child", "p/b"] == pytest.approx(45.0)  # (1, 0, 1) against (1, 0, 0)
    assert rows["sibling", "p/a - b"] == pytest.approx(angle(vecs["p"], np.array([-1.0, 1.0, -1.0])))
    assert rows["sibling", "p/a - b"] == pytest.approx(np.degrees(np.arccos(-1 / np.sqrt(3))))


def test_set_shifts_and_leakage_against_hand_numbers():
    lg0 = torch.zeros(2, 6)
    lg1 = torch.tensor([[2.0, 2.0, 0, 0, 1.0, 0], [2.0, 2.0, 0, 0, 1.0, 0]])
    sh = set_shifts(lg0, lg1, {"a": np.array([0, 1]), "b": np.array([4]), "c": np.array([2, 3])})
    d = torch.log_softmax(lg1[0].double(), -1) - torch.log_softmax(lg0[0].double(), -1)
    d = d - d.mean()
    assert sh["a"] == pytest.approx(float(d[[0, 1]].mean()))
    assert sh["b"] == pytest.approx(float(d[4]))
    eff, leak = target_leakage(sh, "a")
    assert eff == pytest.approx(sh["a"] - (sh["b"] + sh["c"]) / 2)
    assert leak == pytest.approx(max(sh["b"], 0) / 2 / sh["a"])  # c falls, so only b leaks


def test_hierarchy_of_the_project_file(tmp_path):
    write_default_corpora(tmp_path)
    raw = load_concepts(tmp_path)
    cs = hierarchy(raw)
    parents = [c for c in cs if c.is_parent]
    assert [c.name for c in parents] == list(raw["parents"])
    for p in parents:
        assert sorted(p.words) == sorted(raw["parents"][p.name]["words"])
    assert sum(not c.is_parent for c in cs) == sum(len(v["children"]) for v in raw["parents"].values())
    animal = next(c for c in cs if c.name == "animal")
    assert "dog" in animal.words and any(c.name == "animal/mammal" and c.parent == "animal" for c in cs)


def planted_model(tilt: float = 0.0):
    """A tiny model whose unembedding carries a planted hierarchy: each word's row = 3 u_parent + 2 v_child + noise,
    v_child orthogonal to u_parent; with `tilt` t each parent's first child leans along its parent and the second
    away from it (v = sqrt(1 - t^2) v + / - t u_parent), the third stays orthogonal."""
    concepts = planted_concepts()
    words = [w for ws in PARENTS.values() for w in ws]
    filler = [f"w{i}" for i in range(300)]
    tok = make_tiny_tokenizer(["the i saw a look at that"], extra_words=words + filler)
    model = make_tiny_model(len(tok), n_layers=2, d_model=32, seed=0)
    rng = np.random.default_rng(3)
    d = 32
    U = np.linalg.qr(rng.normal(size=(d, 12)))[0].T  # 3 parents + 9 children, orthonormal
    W = rng.normal(size=(len(tok), d))
    for i, ws in enumerate(PARENTS.values()):
        for j in range(3):
            sign = (1, -1, 0)[j]
            v = np.sqrt(1 - (tilt * sign) ** 2) * U[3 + 3 * i + j] + tilt * sign * U[i]
            for w in ws[4 * j : 4 * j + 4]:
                W[tok.convert_tokens_to_ids(w)] = 3 * U[i] + 2 * v + 0.3 * rng.normal(size=d)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.from_numpy(W).float())
    return model, tok, concepts


@pytest.fixture(scope="module")
def planted():
    return planted_model()


def test_planted_hierarchy_is_found_and_the_controls_are_not(planted):
    model, tok, concepts = planted
    geo = model_geometry(model, tok, concepts, prompts=["the", "i saw a", "look at that"], seed=0)
    s = geo.summary
    assert s["whitening_deviation"] < 1e-8
    assert s["coverage"]["share"] == 1.0
    assert 80 <= s["median_child"] <= 100 and s["share_80_100"] >= 0.8
    assert 80 <= s["median_parent_root"] <= 100, s["median_parent_root"]
    assert s["controls"]["random_parents"]["median_child"] > 100
    # nine child angles: the random parents are drawn three times and pooled (27 angles), the others once
    assert s["n_child"] == 9 and s["controls"]["random_parents"]["draws"] == 3
    assert s["controls"]["random_parents"]["n_child"] == 27 and s["controls"]["mean_estimator"]["n_child"] == 9
    assert s["orthogonality"] == {"estimator": True, "mean_estimator": True, "random_parents_breaks": True,
                                  "separates": True, "holds": True}
    assert s["separation_auc"] > 0.95 and s["controls"]["shuffled"]["separation_auc"] < 0.8
    assert s["intervention"]["share_own_up"] == 1.0 and s["intervention"]["median_effect"] > 0
    # parents are far apart and children sit closer to their own parent than to the others
    for c in (c for c in concepts if not c.is_parent):
        own = np.corrcoef(geo.vectors[c.name], geo.vectors[c.parent])[0, 1]
        assert all(own > np.corrcoef(geo.vectors[c.name], geo.vectors[q])[0, 1] for q in PARENTS if q != c.parent)


def test_random_parents_pool_draws_only_for_a_small_hierarchy(planted):
    """One draw from 24 child angles on; below, enough draws to reach 24. The first draw does not depend on how many
    follow (a large hierarchy's control is the single draw it always was), and later draws differ from it."""
    assert [random_parent_draws(n) for n in (0, 1, 8, 9, 23, 24, 42)] == [24, 24, 3, 3, 2, 1, 1]
    model, tok, concepts = planted
    geo = model_geometry(model, tok, concepts, seed=0)
    g = geo.whitening.apply(unembedding(model))
    one, three = random_parent_vectors(g, geo.cs, "lda", 0), random_parent_vectors(g, geo.cs, "lda", 0, draws=3)
    assert len(one) == 1 and len(three) == 3
    for name in PARENTS:
        np.testing.assert_array_equal(one[0][name], three[0][name])
        assert not np.allclose(three[0][name], three[1][name])
    for c in concepts:
        if not c.is_parent:  # children keep their own vectors in every draw
            assert all(np.array_equal(d[c.name], geo.vectors[c.name]) for d in three)


def test_children_planted_leaning_on_their_parent_fail_the_orthogonality_verdict():
    """Children planted at about +-30 degrees from orthogonal to their parent: the LDA estimator's angle still reads
    about 90 degrees (by construction), the plain means show the lean, so the verdict is that orthogonality does not
    hold; the verdict's parts against hand-made summaries."""
    model, tok, concepts = planted_model(tilt=0.5)
    s = model_geometry(model, tok, concepts, seed=0).summary
    mean = s["controls"]["mean_estimator"]
    assert mean["share_80_100"] <= 0.34, mean  # only the third child of each parent is orthogonal
    assert s["orthogonality"]["mean_estimator"] is False and s["orthogonality"]["holds"] is False
    lda_angles = s["share_80_100"]
    assert lda_angles >= 0.5, s  # what the LDA estimator alone would claim
    hand = {"share_80_100": 0.9, "separation_auc": 0.95,
            "controls": {"mean_estimator": {"share_80_100": 0.5}, "random_parents": {"share_80_100": 0.05},
                         "shuffled": {"share_80_100": 0.9, "separation_auc": 0.5}}}
    assert orthogonality_verdict(hand)["holds"] is True
    hand["controls"]["random_parents"]["share_80_100"] = 0.6  # the control passes too: no power
    assert orthogonality_verdict(hand) == {"estimator": True, "mean_estimator": True, "random_parents_breaks": False,
                                           "separates": True, "holds": False}
    hand["controls"]["random_parents"]["share_80_100"] = 0.05
    hand["controls"]["shuffled"]["separation_auc"] = 0.8  # the vectors pick out their words no better than chance
    assert orthogonality_verdict(hand)["separates"] is False and orthogonality_verdict(hand)["holds"] is False
    del hand["controls"]["mean_estimator"]  # a missing control fails
    hand["controls"]["shuffled"]["separation_auc"] = 0.5
    assert orthogonality_verdict(hand)["mean_estimator"] is False
    assert orthogonality_verdict({"share_80_100": None, "controls": {}})["holds"] is False


def test_a_shuffled_unembedding_passes_the_angles_but_not_the_verdict(planted):
    """No hierarchy at all (the planted rows shuffled over the vocabulary): the LDA child angles still read about 90
    degrees (the plain means' too, noisily, with three train words per child), so only separation tells, and the
    verdict fails."""
    model, tok, concepts = planted
    shuffled = copy.deepcopy(model)
    with torch.no_grad():
        w = shuffled.lm_head.weight
        w.copy_(w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))])
    s = model_geometry(shuffled, tok, concepts, seed=0).summary
    v = s["orthogonality"]
    assert v["estimator"] and 80 <= s["median_child"] <= 100, s  # the angles alone would claim a hierarchy
    assert not v["separates"] and not v["holds"], (s["separation_auc"], s["controls"]["shuffled"])


def test_lda_needs_three_rows_and_concepts_with_fewer_train_tokens_are_left_out(planted):
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(3)
    two = rng.normal(size=(2, 16))
    # why: Ledoit-Wolf leaves two rows unshrunk, a rank-1 covariance with no lda direction
    assert abs(LedoitWolf().fit(two).shrinkage_) < 1e-12
    np.testing.assert_allclose(concept_vector(two, "lda"), two.mean(0))
    three = rng.normal(size=(3, 16))
    assert LedoitWolf().fit(three).shrinkage_ > 1e-3
    assert not np.allclose(concept_vector(three, "lda"), three.mean(0))
    # a child with three words keeps two train tokens: it gets no vector, so no angle (not a ~180 degree outlier)
    model, tok, concepts = planted
    short = [Concept(c.name, c.parent, c.words[:3]) if c.name == "fauna/c0" else c for c in concepts]
    geo = model_geometry(model, tok, short, seed=0)
    assert len(geo.cs.train["fauna/c0"]) == 2 and "fauna/c0" not in geo.vectors
    assert geo.summary["coverage"]["concepts"] == len(concepts) - 1
    children = [r for r in hierarchy_angles(geo.vectors, short) if r["kind"] == "child"]
    assert len(children) == 8 and all(70 <= r["angle"] <= 110 for r in children), children
    # holding out nearly every word leaves no child a vector: an error, not a run of empty statistics
    with pytest.raises(MechdiffError, match="no child concept keeps 3 train tokens"):
        model_geometry(model, tok, concepts, seed=0, test_frac=0.9)


def test_hidden_directions_carry_the_causal_inner_product(planted):
    model, tok, concepts = planted
    geo = model_geometry(model, tok, concepts, seed=0)
    w = model.model.norm.weight.detach().double().numpy() * np.linspace(0.5, 2.0, 32)
    M = hidden_metric(geo.whitening, w)
    v1, v2 = geo.vectors["fauna"], geo.vectors["tools"]
    h1, h2 = hidden_direction(v1, geo.whitening, w), hidden_direction(v2, geo.whitening, w)
    lhs = (h1 @ M @ h2) / np.sqrt((h1 @ M @ h1) * (h2 @ M @ h2))
    rhs = (v1 @ v2) / (np.linalg.norm(v1) * np.linalg.norm(v2))
    assert lhs == pytest.approx(rhs, abs=1e-9)


def test_hidden_directions_push_their_parent_through_the_final_norm_and_head(planted):
    from mechdiff.analysis.geometry import final_norm_weight, site_interventions
    from mechdiff.model.sites import Site

    model, tok, concepts = planted
    geo = model_geometry(model, tok, concepts, seed=0)
    w = final_norm_weight(model)
    with torch.no_grad():  # a non-trivial final norm, so the division by its weight matters
        model.model.norm.weight.copy_(torch.linspace(0.5, 2.0, 32))
    try:
        w = final_norm_weight(model)
        dirs = {p: hidden_direction(geo.vectors[p], geo.whitening, w) for p in PARENTS}
        rows = site_interventions(model, tok, ["the", "i saw a", "look at that"], Site(1, "resid_post"), dirs,
                                  {p: geo.cs.test[p] for p in PARENTS}, scale=0.5)
    finally:
        with torch.no_grad():
            model.model.norm.weight.fill_(1.0)
    assert all(r["effect"] > 0 and r["own"] > 0 for r in rows), rows


def test_a_concept_edited_in_the_tuned_model_moves_most(planted):
    model, tok, concepts = planted
    tuned = copy.deepcopy(model)
    rng = np.random.default_rng(5)
    u = torch.from_numpy(rng.normal(size=32)).float()
    with torch.no_grad():  # push the input embeddings of every "tools" word along one direction
        for w in PARENTS["tools"]:
            tuned.model.embed_tokens.weight[tok.convert_tokens_to_ids(w)] += 0.5 * u
    gb = model_geometry(model, tok, concepts, seed=0)
    gt = model_geometry(tuned, tok, concepts, seed=0)
    summ, rows = compare_pair(gb, gt)
    assert summ["most_moved_parent"] == "tools"
    assert summ["min_cos_unembedding"] == pytest.approx(1.0)  # the LM head is untouched
    shift = {r["concept"]: r["shift"] for r in rows}
    assert shift["tools"] > 2 * max(shift["fauna"], shift["foods"])


def _simplex_set(vertices: np.ndarray, n: int, noise: float, seed: int) -> tuple[np.ndarray, ConceptSet]:
    """Rows of g for one parent whose children's tokens sit at planted vertices (+ noise); vectors = train means."""
    rng = np.random.default_rng(seed)
    k, d = vertices.shape
    g = np.concatenate([np.repeat(vertices, 2 * n, axis=0) + noise * rng.normal(size=(2 * k * n, d)),
                        rng.normal(size=(50, d))])
    concepts = [Concept("p", None, ["x"])] + [Concept(f"p/c{i}", "p", ["x"]) for i in range(k)]
    train = {f"p/c{i}": np.arange(2 * n * i, 2 * n * i + n) for i in range(k)}
    test = {f"p/c{i}": np.arange(2 * n * i + n, 2 * n * (i + 1)) for i in range(k)}
    train["p"], test["p"] = np.concatenate(list(train.values())), np.concatenate(list(test.values()))
    cs = ConceptSet(concepts, train, test)
    cs.vectors = {c: g[ids].mean(0) for c, ids in train.items()}
    return g, cs


def test_polytope_of_a_planted_simplex_and_of_a_degenerate_one():
    rng = np.random.default_rng(7)
    d, k = 16, 4
    common = 3 * np.eye(d)[0]
    vert = common + 2 * np.linalg.qr(rng.normal(size=(d, k)))[0].T  # parent part + orthogonal child parts
    g, cs = _simplex_set(vert, 40, 0.3, 0)
    (row,) = polytope(g, cs)
    assert row["k"] == k and row["chance"] == 0.25 and row["n_test"] == 4 * 40
    assert row["accuracy"] == 1.0 and row["own_coord"] == pytest.approx(1.0, abs=0.05)
    V = np.stack([cs.vectors[f"p/c{i}"] for i in range(k)])
    sv = np.linalg.svd(V, compute_uv=False)
    assert row["sv_ratio"] == pytest.approx(sv[-1] / sv[0]) and row["sv_ratio"] > 0.2
    # independent reference for the assignment: nearest point of the vertices' span, coordinates by normal equations
    beta = np.linalg.solve(V @ V.T, V @ g[cs.test["p/c2"]].T).T
    assert np.all(beta.argmax(1) == 2)
    # a vertex halfway between two others: the vertices are linearly dependent, no 3-simplex
    flat = vert.copy()
    flat[3] = (vert[0] + vert[1]) / 2
    g2, cs2 = _simplex_set(flat, 40, 0.01, 1)
    (row2,) = polytope(g2, cs2)
    assert row2["sv_ratio"] < 0.01
    # children with no signal of their own: vertex accuracy at chance
    g3, cs3 = _simplex_set(np.repeat(common[None], k, axis=0), 200, 1.0, 2)
    (row3,) = polytope(g3, cs3)
    assert abs(row3["accuracy"] - 0.25) < 0.08
    s = polytope_summary([row, row3])
    assert s["accuracy"] == pytest.approx((160 * 1.0 + 800 * row3["accuracy"]) / 960)
    assert s["parents"] == 2 and s["chance"] == 0.25
    assert polytope_summary([])["accuracy"] is None


def test_planted_children_form_simplices_and_their_pushes_keep_to_their_siblings(planted):
    from mechdiff.analysis.geometry import child_interventions, context_states

    model, tok, concepts = planted
    geo = model_geometry(model, tok, concepts, prompts=["the", "i saw a", "look at that"], seed=0)
    s = geo.summary
    assert s["polytope"]["parents"] == 3 and s["polytope"]["accuracy"] == 1.0
    assert s["polytope"]["chance"] == pytest.approx(1 / 3) and s["polytope"]["median_sv_ratio"] > 0.2
    assert s["controls"]["shuffled"]["polytope"]["accuracy"] < 0.75
    c = s["child_intervention"]
    assert c["children"] == 9 and c["share_own_top"] == 1.0 and c["median_effect"] > 0
    # the parent's push moves its children's words together, a child's push sets them apart
    assert c["median_ratio_parent"] < 0.25 * c["median_ratio_child"], c
    # ratio_parent against a hand computation with set_shifts for one parent
    hidden = torch.from_numpy(context_states(model, tok, ["the", "i saw a", "look at that"])).float()
    norm = float(hidden.norm(dim=1).median())
    u = torch.from_numpy(0.5 * norm * hidden_direction(geo.vectors["tools"], geo.whitening, None)).float()
    kids = [f"tools/c{j}" for j in range(3) if len(geo.cs.test[f"tools/c{j}"])]
    with torch.no_grad():
        sh = set_shifts(model.lm_head(hidden), model.lm_head(hidden + u), {k: geo.cs.test[k] for k in kids})
    want = np.median([abs(sh[a] - sh[b]) for i, a in enumerate(kids) for b in kids[i + 1:]])
    rows = child_interventions(model, hidden, geo.cs, geo.whitening, scale=0.5)
    assert next(r for r in rows if r["parent"] == "tools")["ratio_parent"] == pytest.approx(want, rel=1e-6)
    per_parent = {r["parent"]: r["ratio_parent"] for r in rows}  # each parent counted once in the summary
    assert len(per_parent) == 3 and c["median_ratio_parent"] == pytest.approx(np.median(list(per_parent.values())))
