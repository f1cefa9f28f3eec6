"""Probes: planted answers (separable -> 1, shuffled -> chance, the planted latent at k = 1, bias c for c x), grouped
folds, and scores that equal scikit-learn's own on the same folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics import r2_score
from sklearn.model_selection import cross_val_score

from mechdiff.analysis.probes import (
    ProbeSettings,
    Task,
    binary_sparse_tasks,
    check_disjoint_groups,
    concept_tasks,
    feature_task,
    group_folds,
    make_estimator,
    mean_token_embeddings,
    probe,
    probe_by_layer,
    reconstruction_bias,
    sae_reconstruction_bias,
    shuffled_control,
    sparse_probe,
    summarise,
    top_k_latents,
)
from mechdiff.data.corpus import Prompt
from mechdiff.errors import MechdiffError


def planted(n: int, d: int, *, seed: int, margin: float = 0.5, family: int = 5):
    """Linearly separable data (labels = side of a random hyperplane, a margin kept) in families of `family` rows."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    X = rng.normal(size=(4 * n, d))
    s = X @ w / np.linalg.norm(w)
    X = X[np.abs(s) > margin][:n]
    y = (X @ w > 0).astype(int)
    return X, y, np.repeat(np.arange(n // family + 1), family)[:n]


def test_planted_separable_reaches_accuracy_one():
    X, y, g = planted(300, 8, seed=0)
    r = probe(X[:200], y[:200], g[:200], X[200:], y[200:], kind="classify", settings=ProbeSettings(C=100.0))
    assert r.test == 1.0 and r.train == 1.0
    assert np.all(r.cv_scores == 1.0) and len(r.cv_scores) == 5


def test_shuffled_labels_give_chance():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1400, 6))
    y = rng.integers(0, 2, size=1400)
    g = np.repeat(np.arange(280), 5)
    r = probe(X[:1000], y[:1000], g[:1000], X[1000:], y[1000:], kind="classify")
    assert abs(r.test - 0.5) < 0.08 and abs(r.cv_mean - 0.5) < 0.06
    # the stage's shuffled-label control on planted separable data: the signal is gone
    Xp, yp, gp = planted(400, 8, seed=2)
    t = Task("planted", "hidden->concept", "classify", np.arange(300), np.arange(300, 400), gp[:300],
             {"base": yp[:300]}, {"base": yp[300:]})
    assert abs(shuffled_control(t, Xp, "base") - 0.5) < 0.2


@pytest.mark.parametrize("kind", ["classify", "regress"])
def test_cv_scores_equal_sklearn_on_the_same_folds(kind):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(240, 12))
    y = (X[:, 0] + 0.8 * rng.normal(size=240) > 0).astype(int) if kind == "classify" else \
        X @ rng.normal(size=12) + rng.normal(size=240)
    g = rng.integers(0, 40, size=240)
    s = ProbeSettings(seed=5)
    est = "logistic" if kind == "classify" else "ridge"
    r = probe(X[:180], y[:180], g[:180], X[180:], y[180:], kind=kind, estimator=est, settings=s)
    folds = group_folds(y[:180], g[:180], kind=kind, folds=5, seed=5)
    ref = cross_val_score(make_estimator(est, kind, s), X[:180], y[:180], cv=folds,
                          scoring="accuracy" if kind == "classify" else "r2")
    np.testing.assert_allclose(r.cv_scores, ref)
    assert r.cv_mean == pytest.approx(ref.mean()) and r.cv_sd == pytest.approx(ref.std(ddof=1))
    fitted = clone(make_estimator(est, kind, s)).fit(X[:180], y[:180])
    want = fitted.score(X[180:], y[180:])  # accuracy / R^2: sklearn's own score of one fit on all of train
    assert r.test == pytest.approx(want)


@pytest.mark.parametrize("kind", ["classify", "regress"])
def test_groups_never_straddle_folds(kind):
    rng = np.random.default_rng(4)
    g = rng.integers(0, 23, size=150)
    y = rng.integers(0, 3, size=150) if kind == "classify" else rng.normal(size=150)
    folds = group_folds(y, g, kind=kind, folds=5, seed=0)
    seen = np.zeros(150, dtype=int)
    for tr, va in folds:
        assert not set(g[tr]) & set(g[va])
        seen[va] += 1
    assert np.all(seen == 1)
    with pytest.raises(MechdiffError, match="fewer than 5 CV folds"):
        group_folds(y, g % 3, kind=kind, folds=5)


def test_regression_recovers_a_planted_linear_target_and_r2_is_sklearns():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(300, 10))
    Y = X @ rng.normal(size=(10, 3))
    g = np.repeat(np.arange(60), 5)
    r = probe(X[:200], Y[:200], g[:200], X[200:], Y[200:], kind="regress", settings=ProbeSettings(ridge_alpha=1e-3))
    assert r.test > 0.9999 and r.cv_mean > 0.9999
    for e in ("forest", "svm"):  # every estimator runs on multi-output targets; R^2 is sklearn's uniform average
        s = ProbeSettings(n_trees=10)
        r = probe(X[:200], Y[:200], g[:200], X[200:], Y[200:], kind="regress", estimator=e, settings=s)
        fitted = make_estimator(e, "regress", s).fit(X[:200], Y[:200])
        assert r.test == pytest.approx(r2_score(Y[200:], fitted.predict(X[200:])))


def test_bad_input_gives_one_line_errors():
    X = np.ones((20, 3))
    g = np.arange(20)
    with pytest.raises(MechdiffError, match="single class"):
        probe(X, np.zeros(20), g, X, np.zeros(20), kind="classify")
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(MechdiffError, match="NaN"):
        probe(Xn, np.arange(20) % 2, g, X, np.zeros(20), kind="classify")
    with pytest.raises(MechdiffError, match="at least 1 rows"):
        probe(np.zeros((0, 3)), np.zeros(0), [], X, np.zeros(20), kind="regress")
    with pytest.raises(MechdiffError, match="logistic regression is a classifier"):
        make_estimator("logistic", "regress")
    with pytest.raises(MechdiffError, match="unknown probe estimator"):
        make_estimator("knn", "classify")
    with pytest.raises(MechdiffError, match="in both train and test"):
        check_disjoint_groups(["a", "b"], ["b", "c"])
    with pytest.raises(MechdiffError, match="binary 0/1"):
        top_k_latents(np.ones((4, 3)), np.array([0, 1, 2, 1]), 1)


def test_sparse_probing_picks_the_planted_latent_at_k1():
    rng = np.random.default_rng(7)
    n, width, planted_latent = 400, 64, 17
    y = rng.integers(0, 2, size=n)
    Z = rng.exponential(0.3, size=(n, width)) * (rng.random((n, width)) < 0.2)  # sparse, nonnegative, no signal
    Z[:, planted_latent] = 2.0 * y + rng.uniform(0, 0.5, size=n)  # separable along the planted latent alone
    assert top_k_latents(Z[:300], y[:300], 1).tolist() == [planted_latent]
    res = sparse_probe(Z[:300], y[:300], Z[300:], y[300:], ks=(1, 2, 5))
    assert [r["k"] for r in res] == [1, 2, 5]
    assert res[0]["latents"] == [planted_latent] and res[0]["test"] == 1.0
    assert all(planted_latent in r["latents"] and len(r["latents"]) == r["k"] for r in res)
    diff = np.abs(Z[:300][y[:300] == 1].mean(0) - Z[:300][y[:300] == 0].mean(0))
    assert res[2]["latents"] == np.argsort(-diff)[:5].tolist()  # SAEBench: largest |mean_pos - mean_neg|


def test_relative_reconstruction_bias_known_answers():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(50, 7))
    assert reconstruction_bias(X, X) == pytest.approx(1.0)
    assert reconstruction_bias(X, 0.6 * X) == pytest.approx(0.6)
    Xh = X + 0.3 * rng.normal(size=X.shape)
    want = np.mean(np.sum(Xh**2, 1)) / np.mean(np.sum(X * Xh, 1))
    assert reconstruction_bias(X, Xh) == pytest.approx(want)

    class Scaled(torch.nn.Module):
        def forward(self, x):
            return 1.5 * x

    assert sae_reconstruction_bias(Scaled(), X, chunk=16) == pytest.approx(1.5)
    with pytest.raises(MechdiffError, match="not positive"):
        reconstruction_bias(X, -X)


def _prompts() -> list[Prompt]:
    """Cultural / control / neutral / two traits (label 0-3 families), families never straddling splits."""
    out, pid = [], 0
    for fam in range(30):
        split = "test" if fam % 5 == 0 else "val" if fam % 5 == 1 else "train"
        for ds in ("cultural", "control", "neutral"):
            for _ in range(3):
                out.append(Prompt(pid, f"{ds} {fam}", ds, split, f"{ds}:{fam}"))
                pid += 1
        for trait in ("warmth", "certainty"):
            for label in range(4):
                out.append(Prompt(pid, f"{trait} {fam} {label}", "trait", split, f"trait:{trait}:{fam}", label, trait))
                pid += 1
    return out


def test_tasks_from_prompts():
    prompts = _prompts()
    tasks, skipped = concept_tasks(prompts)
    assert [t.name for t in tasks] == ["cultural_vs_control", "trait:certainty", "trait:warmth"] and not skipped
    cc = tasks[0]
    assert {prompts[i].dataset for i in cc.train} == {"cultural", "control"}
    assert all(prompts[i].split == "train" for i in cc.train) and all(prompts[i].split == "test" for i in cc.test)
    assert cc.y_train["base"].tolist() == [int(prompts[i].dataset == "cultural") for i in cc.train]
    assert tasks[1].graded and sorted(set(tasks[1].y_test["tuned"].tolist())) == [0, 1, 2, 3]
    assert cc.chance("base") == pytest.approx(0.5)
    bt = binary_sparse_tasks(prompts)
    assert [b[0] for b in bt] == ["cultural_vs_control", "trait:certainty", "trait:warmth"]
    assert bt[1][2].tolist() == [int(prompts[i].label >= 2) for i in bt[1][1]]
    # another grade scale (1, 2, 4, 5): high vs low splits at its middle (3), not at the 0-3 scale's 2
    five = [Prompt(q.pid, q.text, q.dataset, q.split, q.group, q.label + 1 + (q.label >= 2), q.trait) for q in prompts]
    bt5 = binary_sparse_tasks(five)
    assert bt5[1][2].tolist() == [int(five[i].label > 3) for i in bt5[1][1]] == bt[1][2].tolist()
    F = np.zeros((len(prompts), 6))
    F[:, 4] = np.arange(len(prompts))
    F[:, 1] = np.arange(len(prompts)) % 2
    ft = feature_task(prompts, {"base": F, "tuned": F[:, ::-1]}, n_features=3)
    assert ft.info["features"] == {"base": [4, 1], "tuned": [1, 4]}  # live features by variance only
    assert len(ft.train) == sum(q.split == "train" for q in prompts)
    moved = next(q.pid for q in prompts if q.group == "cultural:2")  # one prompt of a train family into test
    bad = [Prompt(q.pid, q.text, q.dataset, "test" if q.pid == moved else q.split, q.group) for q in prompts]
    with pytest.raises(MechdiffError, match="in both train and test"):
        concept_tasks(bad)


def test_mean_token_embeddings_matches_a_loop():
    rng = np.random.default_rng(9)
    E = rng.normal(size=(20, 4))
    lens = [3, 5, 2]
    tok_prompt = np.repeat(np.arange(3), lens)
    tok_pos = np.concatenate([np.arange(n) for n in lens])
    tok_id = rng.integers(0, 20, size=len(tok_pos))
    got = mean_token_embeddings(E, tok_id, tok_prompt, tok_pos, 3)
    for p in range(3):
        ids = tok_id[(tok_prompt == p) & (tok_pos > 0)]
        np.testing.assert_allclose(got[p], E[ids].mean(0))
    from_two = mean_token_embeddings(E, tok_id, tok_prompt, tok_pos, 2, first=2)  # a shared opening of 2 tokens
    for p in range(2):
        np.testing.assert_allclose(from_two[p], E[tok_id[(tok_prompt == p) & (tok_pos >= 2)]].mean(0))
    with pytest.raises(MechdiffError, match="no tokens"):
        mean_token_embeddings(E, tok_id, tok_prompt, tok_pos, 4)


def test_probe_by_layer_finds_the_planted_layer_and_the_tuned_difference():
    X, y, g = planted(240, 6, seed=10)
    rng = np.random.default_rng(11)
    noise = {s: rng.normal(size=X.shape) for s in ("L0", "L2", "L4")}
    t = Task("c", "hidden->concept", "classify", np.arange(180), np.arange(180, 240), g[:180],
             {m: y[:180] for m in ("base", "tuned")}, {m: y[180:] for m in ("base", "tuned")})

    def read(m, s):  # base encodes the concept at L2 only, tuned at L2 and L4
        return X if s == "L2" or (m == "tuned" and s == "L4") else noise[s]

    s = ProbeSettings(C=100.0, n_trees=10)
    rows = probe_by_layer([t], ["L0", "L2", "L4"], read, compare_sites=["L2"], settings=s,
                          layer_of=lambda x: int(x[1:]))
    assert len(rows) == 2 * 3 + 2 * 3  # the curve everywhere, three more estimators at L2
    summ = summarise(rows, [t], compare_sites=["L2"])["c"]
    assert summ["base"]["best_layer"] == 2 and summ["base"]["test"] == 1.0
    assert summ["max_abs_diff"]["layer"] == 4 and summ["max_abs_diff"]["diff"] > 0.3
    assert set(summ["estimators"]["L2"]) == {"logistic", "ridge", "forest", "svm"}
    # two worker processes: the same rows in the same order, number for number
    from dataclasses import replace

    again = probe_by_layer([t], ["L0", "L2", "L4"], read, compare_sites=["L2"], settings=replace(s, n_jobs=2),
                           layer_of=lambda x: int(x[1:]))
    assert again == rows


def test_task_without_enough_families_per_class_is_skipped():
    """A class whose train prompts come from fewer families than CV folds is skipped with a reason, not a crash."""
    from types import SimpleNamespace

    from mechdiff.analysis.probes import concept_tasks

    def q(ds, split, group, trait="", label=-1):
        return SimpleNamespace(dataset=ds, split=split, group=group, trait=trait, label=label)

    prompts = [q("cultural", "train", f"c{i % 6}") for i in range(30)] + [q("control", "train", f"k{i % 3}")
                                                                          for i in range(30)]
    prompts += [q("cultural", "test", "ct"), q("control", "test", "kt")]
    tasks, skipped = concept_tasks(prompts, folds=5)
    assert not tasks and "only 3 families" in skipped["cultural_vs_control"]
    tasks, skipped = concept_tasks(prompts, folds=3)
    assert [t.name for t in tasks] == ["cultural_vs_control"] and not skipped


def _run_world(tmp_path, seed: int = 12):
    """Two small stores over `_prompts()` (3 tokens each; L0 and L1, views last / mean / tokens): at L1 coordinate 0
    of every token after the first is 4 x cultural + noise (the first token is a huge 'sink'), tuned adds
    coordinate 1 = 1.5 x cultural; L0 is noise. Per model a TopK SAE with latents ReLU(x_j) and a skewed decoder."""
    from mechdiff.data.store import ActStore
    from mechdiff.sae import TopKSAE

    prompts = _prompts()
    n, L, d = len(prompts), 3, 6
    rng = np.random.default_rng(seed)
    cult = np.repeat([float(q.dataset == "cultural") for q in prompts], L)
    pos = np.tile(np.arange(L), n)
    tok_ids = rng.integers(0, 40, n * L)
    stores, saes = [], {}
    for m in ("base", "tuned"):
        toks = {}
        for layer in (0, 1):
            T = rng.normal(size=(n * L, d))
            if layer == 1:
                T[:, 0] += 4 * cult
                if m == "tuned":
                    T[:, 1] += 1.5 * cult
            T[pos == 0] += 50.0  # the sink
            toks[f"L{layer}.resid_post"] = T.astype(np.float32)
        views = {s: {"last": T.reshape(n, L, d)[:, -1], "mean": T.reshape(n, L, d).mean(1)} for s, T in toks.items()}
        st = ActStore.create(tmp_path / f"{m}.zarr", prompt_ids=np.array([q.pid for q in prompts]),
                             n_tokens=np.full(n, L), datasets=[q.dataset for q in prompts],
                             splits=[q.split for q in prompts], sites={s: d for s in toks},
                             views={s: ["last", "mean", "tokens"] for s in toks}, tok_ids=tok_ids)
        with st.writer() as w:
            w.append(views, toks)
        stores.append(ActStore.open(tmp_path / f"{m}.zarr"))
        sae = TopKSAE(d, d, d)
        with torch.no_grad():
            sae.W_enc.copy_(torch.eye(d))
            sae.dec.copy_(torch.eye(d) + 0.3 * torch.as_tensor(rng.normal(size=(d, d)), dtype=torch.float32))
        saes[m, 1] = sae
    return prompts, stores, saes


def test_run_probes_end_to_end_matches_sklearn_and_numpy(tmp_path):
    """The stage's whole run on two stores: the planted layer and latent, every number recomputed with sklearn /
    numpy from the stores (curve probe, sparse and dense probing, feature targets, reconstruction bias)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mechdiff.analysis.probe_run import (
        LAYER_COLUMNS,
        ProbeRunSettings,
        layer_table,
        plot_layers,
        run_probes,
    )

    prompts, (base, tuned), saes = _run_world(tmp_path)
    E = {m: np.random.default_rng(i).normal(size=(40, 4)) for i, m in enumerate(("base", "tuned"))}
    st = ProbeRunSettings(sae_layers=(1,), sae_view="tokens", n_features=3, sparse_k=(1, 2),
                          probe=ProbeSettings(folds=3, n_trees=5, ridge_alpha=10.0))
    lines: list[str] = []
    run = run_probes(base, tuned, prompts, saes, lambda m: E[m], st, progress=lines.append)
    m = run.metrics
    assert m["sites"] == ["L0.resid_post", "L1.resid_post"] and m["compare_sites"] == ["L1.resid_post"]
    assert not m["skipped"]
    assert lines[0].startswith("probes: SAE features of 2 SAEs (")
    assert any(x.startswith("probes: SAE base_L1: sparse probing mean test accuracy k=1 ") for x in lines)

    # hidden -> concept: the concept is at L1, and the curve probe's test score is sklearn's on the same rows
    cc = m["tasks"]["cultural_vs_control"]
    assert cc["base"]["best_layer"] == 1 and cc["tuned"]["best_layer"] == 1
    assert set(cc["estimators"]["L1.resid_post"]) == {"logistic", "ridge", "forest", "svm"}
    assert set(cc["shuffled_test"]) == {"base", "tuned"}
    tr = [i for i, q in enumerate(prompts) if q.split == "train" and q.dataset in ("cultural", "control")]
    te = [i for i, q in enumerate(prompts) if q.split == "test" and q.dataset in ("cultural", "control")]
    y = np.array([int(q.dataset == "cultural") for q in prompts])
    X = base.read("L1.resid_post", "last")
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(X[tr], y[tr])
    row = next(r for r in run.rows if r["task"] == "cultural_vs_control" and r["model"] == "base"
               and r["layer"] == 1 and r["estimator"] == "logistic")
    assert row["test"] == pytest.approx(ref.score(X[te], y[te])) and row["kind"] == "classify"

    # per-prompt SAE features = mean of ReLU(x) over each prompt's tokens after the first (numpy)
    tok = base.read("L1.resid_post", "tokens").reshape(len(prompts), 3, -1)
    Z = np.maximum(tok[:, 1:], 0).mean(1)
    tr_all = [i for i, q in enumerate(prompts) if q.split == "train"]
    ft = m["tasks"]["sae_L1_features"]
    assert ft["features"]["base"] == np.argsort(-Z[tr_all].var(0), kind="stable")[:3].tolist()
    assert set(ft["embedding_test"]) == {"base", "tuned"}
    emb = [r for r in run.rows if r["site"] == "embedding"]
    assert {r["layer"] for r in emb} == {-1} and {r["strategy"] for r in emb} == {"embedding->feature"}

    # sparse probing: the planted latent 0 at k = 1, accuracies = sklearn's on numpy's top-k latents
    sp = m["sparse_probing"]["base_L1"]["cultural_vs_control"]
    for k in (1, 2):
        idx = np.argsort(-np.abs(Z[tr][y[tr] == 1].mean(0) - Z[tr][y[tr] == 0].mean(0)), kind="stable")[:k]
        assert k > 1 or idx.tolist() == [0]
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(Z[tr][:, idx], y[tr])
        assert sp[str(k)] == pytest.approx(ref.score(Z[te][:, idx], y[te]))
    assert sp["1"] > 0.9
    D = base.read("L1.resid_post", "mean")
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(D[tr], y[tr])
    assert sp["dense"] == pytest.approx(ref.score(D[te], y[te]))
    rows = [r for r in run.sparse_rows if r["sae"] == "base_L1" and r["task"] == "cultural_vs_control"]
    assert [r["k"] for r in rows] == [1, 2, "dense"] and rows[0]["latents"] == "0"

    # relative reconstruction bias on the test prompts' tokens after the first
    test = [i for i, q in enumerate(prompts) if q.split == "test"]
    for mm, store in (("base", base), ("tuned", tuned)):
        Xt = store.read("L1.resid_post", "tokens").reshape(len(prompts), 3, -1)[test, 1:].reshape(-1, 6)
        with torch.no_grad():
            Xh = saes[mm, 1](torch.as_tensor(Xt)).double().numpy()
        want = float((Xh * Xh).sum() / (Xt.astype(np.float64) * Xh).sum())
        assert m["reconstruction_bias"][f"{mm}_L1"] == pytest.approx(want, rel=1e-6)

    table = layer_table(run.rows)
    assert len(table) == len(run.rows) and all(tuple(r) == LAYER_COLUMNS for r in table)
    plot_layers(run.rows, tmp_path / "plots" / "layers.png")
    assert (tmp_path / "plots" / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_probes_without_the_feature_saes_skips_feature_probes(tmp_path):
    from mechdiff.analysis.probe_run import ProbeRunSettings, run_probes

    prompts, (base, tuned), saes = _run_world(tmp_path)
    lines: list[str] = []

    def no_embeddings(m):
        raise AssertionError("no embedding probes without feature probes")

    run = run_probes(base, tuned, prompts, {("base", 1): saes["base", 1]}, no_embeddings,
                     ProbeRunSettings(sae_layers=(1,), sparse_k=(1,), estimators=("logistic",),
                                      probe=ProbeSettings(folds=3)), progress=lines.append)
    assert "probes: warning: feature probes need the base and tuned SAEs (sae.sources): skipped" in lines
    assert set(run.metrics["tasks"]) == {"cultural_vs_control", "trait:certainty", "trait:warmth"}
    assert set(run.metrics["sparse_probing"]) == {"base_L1"} and set(run.metrics["reconstruction_bias"]) == {"base_L1"}
    with pytest.raises(MechdiffError, match="rows are not the kept prompts"):
        run_probes(base, tuned, prompts[:-1], {}, no_embeddings, ProbeRunSettings(sae_layers=(1,)))


def test_concatenated_layers_find_a_concept_split_across_layers():
    """Seed 001's hidden -> concept on layers side by side: a label that is the sign of a + b, with a written at
    one layer and b at another, is out of reach of either layer alone and found by the two side by side."""
    from mechdiff.analysis.probe_run import CONCAT_LAYER, concat_reader

    rng = np.random.default_rng(4)
    n, d = 400, 5
    a, b = rng.normal(size=n), rng.normal(size=n)
    y = (a + b > 0).astype(int)
    g = np.arange(n) // 2
    layers = {}
    for name, v in (("L0", a), ("L1", b)):
        X = rng.normal(size=(n, d))
        X[:, 0] = v
        layers[name] = X

    class Store:
        def read(self, site, view):
            assert view == "last"
            return layers[site.split(".")[0]]

    t = Task("c", "hidden->concept", "classify", np.arange(300), np.arange(300, n), g[:300],
             {m: y[:300] for m in ("base", "tuned")}, {m: y[300:] for m in ("base", "tuned")})
    read = concat_reader({"base": Store(), "tuned": Store()}, [0, 1], "last")
    np.testing.assert_array_equal(read("base", "L0+L1"), np.hstack([layers["L0"], layers["L1"]]))
    s = ProbeSettings(C=100.0)
    single = probe_by_layer([t], ["L0", "L1"], lambda m, site: layers[site], settings=s, layer_of=lambda x: int(x[1:]))
    both = probe_by_layer([t], ["L0+L1"], read, settings=s, layer_of=lambda _: CONCAT_LAYER)
    assert max(r["test"] for r in single) < 0.85 and min(r["test"] for r in both) > 0.95
    assert {r["layer"] for r in both} == {CONCAT_LAYER}


def test_run_probes_concatenated_layers_match_sklearn_and_check_layers(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mechdiff.analysis.probe_run import ProbeRunSettings, run_probes

    prompts, (base, tuned), saes = _run_world(tmp_path)
    st = ProbeRunSettings(sae_layers=(1,), n_features=3, sparse_k=(1,), embedding=False, concat_layers="auto",
                          estimators=("logistic",), probe=ProbeSettings(folds=3, n_trees=5))
    run = run_probes(base, tuned, prompts, saes, lambda m: None, st)
    assert run.metrics["concat_site"] == "L0+L1"
    cc = run.metrics["tasks"]["cultural_vs_control"]
    assert cc["base"]["best_layer"] == 1  # single-layer summaries leave the concatenated rows out
    tr = [i for i, q in enumerate(prompts) if q.split == "train" and q.dataset in ("cultural", "control")]
    te = [i for i, q in enumerate(prompts) if q.split == "test" and q.dataset in ("cultural", "control")]
    y = np.array([int(q.dataset == "cultural") for q in prompts])
    for m, store in (("base", base), ("tuned", tuned)):
        X = np.hstack([store.read("L0.resid_post", "last"), store.read("L1.resid_post", "last")])
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(X[tr], y[tr])
        assert cc["concat"][m] == pytest.approx(ref.score(X[te], y[te]))
    assert cc["concat"]["layers"] == [0, 1]
    rows = [r for r in run.rows if r["site"] == "L0+L1"]
    assert {r["task"] for r in rows} == {"cultural_vs_control", "trait:certainty", "trait:warmth"}
    assert {r["layer"] for r in rows} == {-2} and {r["kind"] for r in rows} == {"classify"}
    with pytest.raises(MechdiffError, match=r"concat_layers \[0, 5\].*not stored: 5"):
        run_probes(base, tuned, prompts, saes, lambda m: None,
                   ProbeRunSettings(sae_layers=(1,), concat_layers=(0, 5)))


def test_auto_concat_layers_take_the_first_third_of_the_stored_layers():
    from mechdiff.analysis.probe_run import auto_concat_layers
    from mechdiff.model.sites import plan_sites

    smollm = plan_sites(30, stride=2, detail_layers=[20, 24, 26])  # the default pair's stored sites
    assert auto_concat_layers(list(smollm)) == (0, 2, 4, 6, 8, 10)
    assert auto_concat_layers(list(plan_sites(18, stride=2))) == (0, 2, 4, 6)  # Gemma-2B depth: 0..6
    assert auto_concat_layers(list(plan_sites(4, stride=1, detail_layers=[2]))) == (0, 1)
    assert auto_concat_layers(["L0.resid_post", "L0.attn_out"]) == ()
