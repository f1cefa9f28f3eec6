"""Feature statistics against scipy / numpy references and planted ground truth."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from mechdiff.analysis.features import (
    NO_THEME,
    activation_stats,
    benjamini_hochberg,
    classify_types,
    cohens_d,
    enrichment,
    examples_markdown,
    graded_scores,
    permutation_enrichment,
    text_themes,
    text_themes_markdown,
    theme_enrichment,
    themes,
    top_examples,
)
from mechdiff.errors import MechdiffError


def test_cohens_d_matches_numpy_and_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (40, 6))
    b = rng.normal(0.5, 2.0, (25, 6))
    d = cohens_d(a, b)
    for j in range(6):
        sp = np.sqrt(((40 - 1) * np.var(a[:, j], ddof=1) + (25 - 1) * np.var(b[:, j], ddof=1)) / (40 + 25 - 2))
        assert d[j] == pytest.approx((b[:, j].mean() - a[:, j].mean()) / sp, rel=1e-12)
        t = stats.ttest_ind(b[:, j], a[:, j], equal_var=True).statistic
        assert d[j] == pytest.approx(t * np.sqrt(1 / 40 + 1 / 25), rel=1e-10)
    # constant and equal -> 0; constant but different -> inf
    z = cohens_d(np.zeros((5, 2)), np.c_[np.zeros(4), np.ones(4)])
    assert z[0] == 0.0 and np.isinf(z[1]) and z[1] > 0


def test_cohens_d_rejects_bad_input():
    with pytest.raises(MechdiffError):
        cohens_d(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(MechdiffError):
        cohens_d(np.array([[np.nan]]), np.zeros((3, 1)))
    with pytest.raises(MechdiffError):
        cohens_d(np.zeros((0, 2)), np.zeros((3, 2)))


def test_activation_stats_and_types_planted():
    rng = np.random.default_rng(1)
    n = 400
    zb = np.zeros((n, 4))
    zt = np.zeros((n, 4))
    on = rng.random(n) < 0.5
    zb[on, 0] = rng.uniform(1, 2, on.sum())  # feature 0: base only -> suppressed on tuned (A)
    zt[on, 0] = 0.05 * zb[on, 0]
    zb[on, 1] = rng.uniform(1, 2, on.sum())  # feature 1: amplified 3x (B)
    zt[on, 1] = 3 * zb[on, 1]
    zt[on, 2] = rng.uniform(1, 2, on.sum())  # feature 2: only on tuned (C)
    zb[:, 3] = rng.uniform(1, 2, n)  # feature 3: unchanged
    zt[:, 3] = zb[:, 3] + rng.normal(0, 0.01, n)
    st = activation_stats(zb, zt)
    np.testing.assert_allclose(st["freq_base"], (zb > 0).mean(0))
    np.testing.assert_allclose(st["mean_tuned"], zt.mean(0))
    np.testing.assert_allclose(st["cohens_d"], cohens_d(zb, zt))
    types, counts = classify_types(st)
    assert list(types) == ["A", "B", "C", ""]
    assert counts == {"A": 1, "B": 1, "C": 1}
    types2, counts2 = classify_types(st, delta_only=np.array([False, False, False, True]))
    assert types2[3] == "C" and counts2["C"] == 2


def _bh_reference(p):
    m = len(p)
    order = np.argsort(p)
    rank = np.empty(m, int)
    rank[order] = np.arange(1, m + 1)
    return np.array([min(1.0, min(m * p[j] / rank[j] for j in range(m) if p[j] >= p[i])) for i in range(m)])


def test_benjamini_hochberg_hand_example_and_reference():
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(benjamini_hochberg([0.02, 0.03, 0.035, 0.5]), [0.035 * 4 / 3] * 3 + [0.5])
    rng = np.random.default_rng(2)
    p = rng.random(50) ** 3
    q = benjamini_hochberg(p)
    np.testing.assert_allclose(q, _bh_reference(p))
    o = np.argsort(p)
    assert np.all(np.diff(q[o]) >= 0) and np.all(q >= p)
    with pytest.raises(MechdiffError):
        benjamini_hochberg([0.1, np.nan])


def test_enrichment_matches_chi2_formula():
    g = np.zeros(200, bool)
    g[:50] = True
    s = np.zeros(200, bool)
    s[:30] = True  # 30 of the group's 50
    s[50:70] = True  # 20 of the other 150
    r = enrichment(g, s)
    assert r["enrichment"] == pytest.approx((30 / 50) / (50 / 200))
    obs = np.array([[30, 20], [20, 130]], float)
    exp = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / obs.sum()
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert r["chi2"] == pytest.approx(chi2)
    assert r["p"] == pytest.approx(stats.chi2.sf(chi2, 1))
    empty = enrichment(g, np.zeros(200, bool))
    assert empty["p"] == 1.0 and np.isnan(empty["enrichment"])


def test_theme_enrichment_planted():
    labels = np.repeat([0, 1, 2], 100)
    sel = np.zeros(300, bool)
    sel[:40] = True
    sel[100:105] = True
    sel[200:205] = True
    rows = theme_enrichment(labels, sel)
    by = {r["theme"]: r for r in rows}
    assert by[0]["enrichment"] == pytest.approx((40 / 100) / (50 / 300))
    assert by[0]["significant"] and by[0]["enrichment"] > 2
    assert by[1]["enrichment"] < 1
    np.testing.assert_allclose([r["q"] for r in rows], benjamini_hochberg([r["p"] for r in rows]))


def test_permutation_enrichment_planted_and_exact():
    rng = np.random.default_rng(3)
    n = 120
    y = np.arange(n) < 60
    acts = rng.normal(0, 1, (n, 30))
    acts[y, 0] += 2.0  # planted cultural feature
    res = permutation_enrichment(acts, y, n_perm=2000, seed=0)
    assert res["diff"][0] == pytest.approx(acts[y, 0].mean() - acts[~y, 0].mean())
    assert res["significant"][0] and res["p"][0] == pytest.approx(1 / 2001)
    assert res["n_significant"] <= 3
    # tiny case against the exact permutation distribution (all C(8,4) = 70 splits)
    x = np.array([[0.1], [0.5], [0.3], [1.2], [0.9], [1.5], [0.2], [1.1]])
    yy = np.array([0, 0, 0, 1, 0, 1, 0, 1], bool) | np.array([0, 0, 1, 0, 0, 0, 0, 0], bool)
    obs = abs(x[yy, 0].mean() - x[~yy, 0].mean())
    splits = [np.isin(np.arange(8), c) for c in itertools.combinations(range(8), 4)]
    exact = np.mean([abs(x[m, 0].mean() - x[~m, 0].mean()) >= obs - 1e-12 for m in splits])
    est = permutation_enrichment(x, yy, n_perm=4000, seed=1)["p"][0]
    assert est == pytest.approx(exact, abs=0.02)


def test_graded_scores_vs_scipy():
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1, 2, 3], 50)
    good = y * 1.0 + rng.normal(0, 0.5, y.size)
    noise = rng.normal(0, 1, y.size)
    anti = -y + rng.normal(0, 0.3, y.size)
    A = np.c_[good, noise, anti, np.ones(y.size)]
    g = graded_scores(A, y)
    for j in range(3):
        assert g["r"][j] == pytest.approx(stats.pearsonr(A[:, j], y).statistic, abs=1e-10)
        assert g["rho"][j] == pytest.approx(stats.spearmanr(A[:, j], y).statistic, abs=1e-10)
        m = np.array([A[y == c, j].mean() for c in range(4)])
        np.testing.assert_allclose(g["class_means"][j], m)
        assert g["separation"][j] == pytest.approx((m[3] - m[0]) / np.std(A[:, j]))
        tau = np.percentile(A[y == 0, j], 95)
        tpr, fpr = np.mean(A[y == 3, j] > tau), np.mean(A[y == 0, j] > tau)
        assert g["tpr"][j] == pytest.approx(tpr) and g["fpr"][j] == pytest.approx(fpr)
        r = stats.pearsonr(A[:, j], y).statistic
        assert g["score"][j] == pytest.approx(0.4 * r + 0.3 * (m[3] - m[0]) / np.std(A[:, j]) + 0.3 * (tpr - fpr))
    assert list(g["keep"]) == [True, False, False, False]
    assert g["monotonic"][0] and not g["monotonic"][2]
    assert g["r"][3] == 0.0 and g["separation"][3] == 0.0
    with pytest.raises(MechdiffError):
        graded_scores(A, np.repeat([0, 1, 2, 4], 50))


def test_themes_recovers_planted_clusters():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(5)
    centres = np.eye(16)[:3] * 5
    truth = np.repeat([0, 1, 2], 40)
    dirs = centres[truth] + rng.normal(0, 0.3, (120, 16))
    res = themes(dirs, k_range=range(2, 8), seed=0)
    assert res["k"] == 3
    assert adjusted_rand_score(truth, res["labels"]) == pytest.approx(1.0)
    assert max(res["silhouette"], key=res["silhouette"].get) == 3


def test_themes_unchanged_by_refactor_reference():
    # independent reference: the pre-refactor themes() loop, written out with sklearn
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(6)
    dirs = rng.normal(0, 1, (90, 10))
    dirs[:30, 0] += 4
    dirs[30:60, 1] += 4
    dirs[7] = 0.0  # a zero direction stays zero
    X = dirs / np.where(np.linalg.norm(dirs, axis=1, keepdims=True) > 0, np.linalg.norm(dirs, axis=1, keepdims=True), 1)
    ref = {}
    for k in range(2, 6):
        km = KMeans(n_clusters=k, n_init=4, random_state=1).fit(X)
        ref[k] = (silhouette_score(X, km.labels_, sample_size=90, random_state=1), km)
    best = max(ref, key=lambda k: ref[k][0])
    res = themes(dirs, k_range=range(2, 6), seed=1)
    assert res["k"] == best
    assert res["silhouette"] == pytest.approx({k: v[0] for k, v in ref.items()}, abs=1e-12)
    np.testing.assert_array_equal(res["labels"], ref[best][1].labels_)
    np.testing.assert_allclose(res["centroids"], ref[best][1].cluster_centers_)
    with pytest.raises(MechdiffError):
        themes(dirs[:2], k_range=range(2, 6))


VOCABS = [
    ["rice", "curry", "spice", "noodle", "dumpling", "bread", "cheese", "soup"],
    ["guitar", "drum", "melody", "violin", "choir", "rhythm", "song", "piano"],
    ["football", "cricket", "tennis", "stadium", "goal", "racket", "league", "referee"],
]


def _planted_topics(seed: int = 0):
    """60 texts from 3 vocabularies (+ 1 stop-word-only text), 90 features each firing on one topic's texts."""
    rng = np.random.default_rng(seed)
    texts, topic = [], []
    for t, words in enumerate(VOCABS):
        for _ in range(20):
            texts.append("what is the " + " and ".join(rng.choice(words, 4, replace=False)) + " in it")
            topic.append(t)
    texts.append("is it the one")  # stop words only
    topic.append(-1)
    topic = np.array(topic)
    truth = np.repeat([0, 1, 2], 30)
    A = np.zeros((len(texts), 93))
    for j, t in enumerate(truth):
        on = rng.choice(np.flatnonzero(topic == t), 12, replace=False)
        A[on, j] = rng.uniform(1, 3, 12)
        # weak firing on other topics' texts: below the top 10, so it must not leak into the representation
        A[rng.choice(np.flatnonzero((topic != t) & (topic >= 0)), 3, replace=False), j] = 0.05
    # 90, 91: never fire; 92: fires only on the stop-word text
    A[-1, 92] = 1.0
    return texts, topic, truth, A


def test_text_themes_recovers_planted_topics():
    from sklearn.metrics import adjusted_rand_score

    texts, _, truth, A = _planted_topics()
    res = text_themes(A, texts, top_n=10, k_range=range(2, 9), seed=0, n_top_words=5)
    assert res["k"] == 3 and max(res["silhouette"], key=res["silhouette"].get) == 3
    assert adjusted_rand_score(truth, res["labels"][:90]) == pytest.approx(1.0)
    assert list(res["labels"][90:]) == [NO_THEME] * 3
    assert res["alive"].sum() == 90
    for c in range(3):
        topic = np.bincount(truth[res["labels"][:90] == c]).argmax()
        assert len(res["top_words"][c]) == 5 and set(res["top_words"][c]) <= set(VOCABS[topic])


def test_text_themes_representation_matches_reference():
    # independent reference: per feature, weighted mean of the unit TF-IDF rows of its top-10 texts, renormalised;
    # each k-means centroid must be the mean of its members' reference vectors
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts, _, _, A = _planted_topics(seed=1)
    res = text_themes(A, texts, top_n=10, k_range=range(2, 6), seed=0)
    vec = TfidfVectorizer(stop_words="english")
    T = vec.fit_transform(texts).toarray()
    assert list(vec.get_feature_names_out()) == list(res["vocabulary"])
    R = np.zeros((90, T.shape[1]))
    for j in range(90):
        top = np.argsort(-A[:, j])[:10]
        v = sum(A[i, j] * T[i] for i in top)
        R[j] = v / np.linalg.norm(v)
        assert set(top) <= set(np.flatnonzero(A[:, j] >= 1))  # the weak 0.05 firings are not among them
    for c in range(res["k"]):
        np.testing.assert_allclose(res["centroids"][c], R[res["labels"][:90] == c].mean(0), atol=1e-10)


def test_text_theme_enrichment_ignores_features_without_theme():
    texts, _, truth, A = _planted_topics()
    res = text_themes(A, texts, top_n=10, k_range=range(2, 9), seed=0)
    delta = np.zeros(93, bool)
    delta[:20] = True  # 20 of topic 0's 30 features
    delta[30:35] = True  # 5 of topic 1's
    delta[90:93] = True  # features without a theme: must not count anywhere
    rows = theme_enrichment(res["labels"], delta, ignore_label=NO_THEME)
    assert NO_THEME not in [r["theme"] for r in rows] and len(rows) == 3
    by_topic = {int(np.bincount(truth[res["labels"][:90] == r["theme"]]).argmax()): r for r in rows}
    assert by_topic[0]["n"] == 90 and by_topic[0]["n_selected"] == 25
    assert by_topic[0]["enrichment"] == pytest.approx((20 / 30) / (25 / 90))
    assert by_topic[2]["enrichment"] == 0.0
    obs = np.array([[20, 10], [5, 55]], float)
    exp = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / obs.sum()
    assert by_topic[0]["p"] == pytest.approx(stats.chi2.sf(((obs - exp) ** 2 / exp).sum(), 1))
    assert by_topic[0]["significant"]
    # without ignoring, the 3 no-theme features form their own group and join the background
    assert len(theme_enrichment(res["labels"], delta)) == 4
    md = text_themes_markdown(res, rows, title="L2")
    assert md.count("\n| ") == 2 + 3 and "k = 3" in md and "3 features have no theme" in md
    row0 = next(line for line in md.splitlines() if line.startswith(f"| {by_topic[0]['theme']} |"))
    assert f"| 30 | 20 | {(20 / 30) / (25 / 90):.2f} |" in row0
    assert set(row0.split(" | ")[1].split(", ")) <= set(VOCABS[0])
    with pytest.raises(MechdiffError):
        theme_enrichment(np.full(5, NO_THEME), np.ones(5, bool), ignore_label=NO_THEME)


def test_text_themes_rejects_bad_input():
    texts, _, _, A = _planted_topics()
    with pytest.raises(MechdiffError, match="texts"):
        text_themes(A, texts[:-1])
    with pytest.raises(MechdiffError):
        text_themes(np.zeros((0, 5)), [])
    with pytest.raises(MechdiffError, match="vocabulary"):
        text_themes(np.ones((3, 4)), ["the", "is it", "and"])
    with pytest.raises(MechdiffError, match="no k"):
        text_themes(A[:, 90:], texts)  # one feature with a theme: nothing to cluster


def test_top_examples_and_markdown():
    toks = ["a", "b", "<c>", "d", "e", "f", "g", "h"]
    pid = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    acts = np.array([0.0, 0.5, 3.0, 2.9, 0.0, 1.0, 0.0, 0.2])
    rec = top_examples(acts, toks, pid, k=3, window=1, per_prompt=1)
    assert [r["row"] for r in rec] == [2, 5]  # row 3 skipped (same prompt), row 7 (0.2) after 5 in prompt 1
    assert rec[0]["left"] == ["b"] and rec[0]["right"] == ["d"] and rec[0]["token"] == "<c>"
    assert rec[1]["left"] == ["e"] and rec[1]["right"] == ["g"]
    rec2 = top_examples(acts, toks, pid, k=10, window=2, per_prompt=2)
    assert [r["row"] for r in rec2] == [2, 3, 5, 7]
    md = examples_markdown(rec, title="f1")
    assert "**<c>**" in md and md.count("\n| ") == 3
    words = [{"rank": 1, "activation": 2.0, "prompt_id": 7, "left": ["How", " is", " Malay"], "token": "alam",
              "right": [" cinema", "|"]}, {"rank": 2, "activation": 1.0, "prompt_id": 8, "left": ["about"],
                                           "token": " Ray", "right": ["."]}]
    rows = examples_markdown(words).splitlines()[2:]
    assert rows[0] == "| 1 | 2 | 7 | How is Malay**alam** cinema\\| |"
    assert rows[1] == "| 2 | 1 | 8 | about **Ray**. |"
    with pytest.raises(MechdiffError):
        top_examples(acts[:3], toks, pid)


def test_benjamini_hochberg_hand_derived_example():
    """q_(i) = min_{j >= i} m p_(j) / j worked by hand for ten p-values, given out of order."""
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    q = np.array([0.01, 0.04, 0.084, 0.084, 0.084, 0.1, 0.074 * 10 / 7, 0.216, 0.216, 0.216])
    perm = np.random.default_rng(0).permutation(p.size)
    np.testing.assert_allclose(benjamini_hochberg(p[perm]), q[perm], rtol=1e-12)
    assert benjamini_hochberg([]).shape == (0,)
    with pytest.raises(MechdiffError):
        benjamini_hochberg([[0.1, 0.2]])


def _planted_sae(rows: np.ndarray):
    """A TopK SAE whose latents are ReLU(<row_j, x>) exactly: encoder = decoder = `rows` (unit), k = width."""
    import torch

    from mechdiff.sae import TopKSAE

    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    sae = TopKSAE(rows.shape[1], rows.shape[0], rows.shape[0])
    with torch.no_grad():
        sae.W_enc.copy_(torch.as_tensor(rows, dtype=torch.float32))
        sae.dec.copy_(torch.as_tensor(rows, dtype=torch.float32))
    return sae


def _planted_pair(n: int = 400, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Base / tuned activations (n, 8): coord 0 suppressed on tuned (A), 1 amplified 3x (B), 2 only on tuned,
    3 unchanged, 4 and 6 new tuned-only content, 5 and 7 always 0."""
    rng = np.random.default_rng(seed)
    Xb, Xt = np.zeros((n, 8)), np.zeros((n, 8))
    on = rng.random(n) < 0.5
    Xb[on, 0] = rng.uniform(1, 2, on.sum())
    Xt[on, 0] = 0.05 * Xb[on, 0]
    Xb[on, 1] = rng.uniform(1, 2, on.sum())
    Xt[on, 1] = 3 * Xb[on, 1]
    Xt[on, 2] = rng.uniform(1, 2, on.sum())
    Xb[:, 3] = rng.uniform(1, 2, n)
    Xt[:, 3] = Xb[:, 3] + rng.normal(0, 0.01, n)
    Xt[~on, 4] = 1.5
    Xt[rng.random(n) < 0.3, 6] = 1.0
    return Xb, Xt


def test_type_c_comes_from_the_delta_sae_planted():
    from mechdiff.analysis.features import (
        FeatureSettings,
        decoder_dirs,
        delta_types,
        feature_table,
        sae_types,
    )
    from mechdiff.sae.sources import encode_rows

    Xb, Xt = _planted_pair()
    eye = np.eye(8)
    base = _planted_sae(eye[:4])  # features = coords 0..3
    tuned = _planted_sae(eye[:5])  # ... and coord 4 (new on tuned)
    # delta features: -e0 (suppression of base feature 0), e1, e2 (changes of base features), e4 (new, fires),
    # e5 (new, never fires), (e6 + e7)/sqrt 2 (new, fires on 30 % of rows)
    delta_rows = np.stack([-eye[0], eye[1], eye[2], eye[4], eye[5], eye[6] + eye[7]])
    delta = _planted_sae(delta_rows)
    Zd = encode_rows(delta, (Xt - Xb).astype(np.float32))
    types, counts = delta_types(decoder_dirs(delta), decoder_dirs(base), Zd)
    assert list(types) == ["", "", "", "C", "", "C"]
    assert counts == {"A": 0, "B": 0, "C": 2}
    # only live base features are counterparts: the base SAE's e2 never fires on base rows (coord 2 is tuned-only
    # content), so the delta's e2 feature is new as well
    base_freq = (encode_rows(base, Xb.astype(np.float32)) > 0).mean(0)
    types, counts = delta_types(decoder_dirs(delta), decoder_dirs(base), Zd, base_freq=base_freq)
    assert list(types) == ["", "", "C", "C", "", "C"] and counts == {"A": 0, "B": 0, "C": 3}
    typed = sae_types({"base": base, "tuned": tuned, "delta": delta}, Xb.astype(np.float32),
                      Xt.astype(np.float32), FeatureSettings())
    assert {src: c for src, (_, c, _) in typed.items()} == {
        "base": {"A": 1, "B": 1, "C": 1}, "tuned": {"A": 1, "B": 1, "C": 2}, "delta": {"A": 0, "B": 0, "C": 3}}
    # the per-feature table: one row per feature of each SAE, its type, and statistics recomputed here by numpy
    cult = {"tuned": {"diff": np.arange(5.0), "q": np.linspace(0, 1, 5)}}
    rows = feature_table(20, typed, cult)
    # per SAE: typed features first, then the rest, each by decreasing |cultural gap| (tuned), else by index
    order = [(r["source"], r["feature"]) for r in rows]
    assert list(typed["base"][0]) == ["A", "B", "C", ""] and order[:4] == [("base", f) for f in range(4)]
    tuned_types = typed["tuned"][0]
    want = sorted(range(5), key=lambda f: (tuned_types[f] == "", -f))
    assert order[4:9] == [("tuned", f) for f in want]
    assert order[9:] == [("delta", f) for f in (2, 3, 5, 0, 1, 4)]
    rows = sorted(rows, key=lambda r: (("base", "tuned", "delta").index(r["source"]), r["feature"]))
    assert "".join(r["type"] or "." for r in rows[9:]) == "..CC.C"
    Zb, Zt = (encode_rows(tuned, X.astype(np.float32)).astype(np.float64) for X in (Xb, Xt))
    pooled = np.sqrt(((len(Zb) - 1) * Zb.var(0, ddof=1) + (len(Zt) - 1) * Zt.var(0, ddof=1)) / (len(Zb) + len(Zt) - 2))
    for f, r in enumerate(rows[4:9]):
        assert r["type"] == typed["tuned"][0][f]
        assert r["freq_base"] == pytest.approx((Zb[:, f] > 0).mean()) and r["freq_tuned"] == pytest.approx((Zt[:, f] > 0).mean())
        assert r["mean_tuned"] == pytest.approx(Zt[:, f].mean(), rel=1e-5)
        if pooled[f] > 0:
            assert r["cohens_d"] == pytest.approx((Zt[:, f].mean() - Zb[:, f].mean()) / pooled[f], rel=1e-4)
        assert (r["cultural_diff"], r["cultural_q"]) == (f, pytest.approx(f / 4))
    assert "cultural_diff" not in rows[0] and "cohens_d" not in rows[9]
    assert rows[12]["freq_delta"] == pytest.approx((Zd[:, 3] > 0).mean())
    # a base counterpart is |cos| >= match_cos: at 0.75 the diagonal feature (cos 0.707 with e6) is still new,
    # at 0.7 it matches once the base SAE has an e6 feature
    base6 = _planted_sae(eye[[0, 1, 2, 3, 6]])
    assert delta_types(decoder_dirs(delta), decoder_dirs(base6), Zd, match_cos=0.75)[1]["C"] == 2
    assert list(delta_types(decoder_dirs(delta), decoder_dirs(base6), Zd, match_cos=0.7)[0]) == [""] * 3 + ["C"] + [""] * 2
    # without a base SAE there is nothing to match against: the delta SAE gets no types
    assert "delta" not in sae_types({"tuned": tuned, "delta": delta}, Xb.astype(np.float32),
                                    Xt.astype(np.float32), FeatureSettings())


def test_delta_only_features_rejects_bad_input():
    from mechdiff.analysis.features import delta_only_features

    with pytest.raises(MechdiffError, match="width"):
        delta_only_features(np.eye(3), np.eye(4), np.ones(3))
    with pytest.raises(MechdiffError, match="delta_freq"):
        delta_only_features(np.eye(3), np.eye(3), np.ones(2))
    with pytest.raises(MechdiffError, match="match_cos"):
        delta_only_features(np.eye(3), np.eye(3), np.ones(3), match_cos=0.0)
    with pytest.raises(MechdiffError, match="base_freq"):
        delta_only_features(np.eye(3), np.eye(3), np.ones(3), base_freq=np.ones(2))
    # no live base feature at all: every firing delta feature is new
    assert delta_only_features(np.eye(3), np.eye(3), np.array([0.5, 0.0, 0.5]),
                               base_freq=np.zeros(3)).tolist() == [True, False, True]


def test_graded_rankings_skip_a_trait_that_lost_a_grade():
    from mechdiff.analysis.features import FeatureResults, graded_rankings

    rng = np.random.default_rng(3)
    y_a = np.repeat([0, 1, 2, 3], 10)
    y_b = np.repeat([0, 1, 2], 10)  # grade 3 subsampled away
    labels = np.concatenate([y_a, y_b])
    traits = np.array(["a"] * y_a.size + ["b"] * y_b.size)
    A = rng.normal(size=(labels.size, 5))
    A[:, 2] += labels  # feature 2 tracks the grade
    rows, skipped, ranked = graded_rankings(A, traits, labels, top=3)
    assert [r["trait"] for r in rows] == ["a"] and set(skipped) == {"b"} and "grade 3" in skipped["b"]
    ref = graded_scores(A[traits == "a"], y_a)
    assert rows[0]["best_feature"] == int(np.argmax(ref["score"])) == 2
    assert rows[0]["score"] == pytest.approx(ref["score"][2]) and rows[0]["n_keep"] == int(ref["keep"].sum())
    # the ranked list: the 3 best features of trait a by score, each with the seed's columns
    assert [r["feature"] for r in ranked] == np.argsort(-ref["score"])[:3].tolist() and ranked[0]["feature"] == 2
    assert [r["rank"] for r in ranked] == [1, 2, 3] and {r["trait"] for r in ranked} == {"a"}
    for r in ranked:
        f = r["feature"]
        assert r["r"] == pytest.approx(stats.pearsonr(A[traits == "a", f], y_a).statistic)
        assert r["rho"] == pytest.approx(stats.spearmanr(A[traits == "a", f], y_a).statistic)
        assert [r[f"mean_{j}"] for j in range(4)] == pytest.approx(
            [A[traits == "a", f][y_a == j].mean() for j in range(4)])
        assert (r["tpr"], r["fpr"], r["keep"], r["monotonic"]) == (ref["tpr"][f], ref["fpr"][f], ref["keep"][f],
                                                                   ref["monotonic"][f])
    res = FeatureResults(metrics={"base_L0": {"type_A": 0}})
    assert "skipped_traits" not in res.metrics_json()
    res.skipped_traits.update(skipped)
    assert res.metrics_json()["skipped_traits"] == {"b": skipped["b"]}


def test_analyse_features_end_to_end_on_stores(tmp_path):
    """The whole analysis on two small stores: planted types per SAE, delta Type C, a trait without grade 3
    skipped (recorded, no crash), themes and examples written."""
    from mechdiff.analysis.features import FeatureSettings, analyse_features
    from mechdiff.data.corpus import Prompt
    from mechdiff.data.store import ActStore

    words = {"cultural": ["festival", "lantern", "harvest", "dance"], "control": ["engine", "bolt", "gear", "pump"]}
    prompts = []
    for ds in ("cultural", "control"):
        for i in range(12):
            prompts.append(Prompt(len(prompts), " ".join(words[ds][j % 4] for j in range(i, i + 3)), ds))
    for trait, grades in (("calm", [0, 1, 2, 3]), ("wry", [0, 1, 2])):
        for g in grades * 3:
            prompts.append(Prompt(len(prompts), f"{trait} sentence of grade {g}", "trait", label=g, trait=trait))
    n, L = len(prompts), 5  # every prompt 5 tokens; position 0 (the sink) is left out of the SAE rows
    rng = np.random.default_rng(0)
    Xb, Xt = _planted_pair(n * L, seed=2)
    stores = []
    for name, X in (("base", Xb), ("tuned", Xt)):
        st = ActStore.create(tmp_path / f"{name}.zarr", prompt_ids=np.arange(n), n_tokens=np.full(n, L),
                             datasets=[q.dataset for q in prompts], splits=["train"] * n,
                             sites={"L0.resid_post": 8}, views={"L0.resid_post": ["tokens"]},
                             tok_ids=rng.integers(0, 50, n * L) if name == "base" else stores[0].index("tok_id"))
        with st.writer() as w:
            w.append({}, {"L0.resid_post": X.astype(np.float32)}, n=n)
        stores.append(ActStore.open(tmp_path / f"{name}.zarr"))
    eye = np.eye(8)
    saes = {"base": _planted_sae(eye[:4]), "tuned": _planted_sae(eye[:5]),
            "delta": _planted_sae(np.stack([-eye[0], eye[1], eye[2], eye[4], eye[5], eye[6] + eye[7]]))}
    res = analyse_features([0], lambda layer: saes, *stores, prompts, lambda i: f"t{i}", view="tokens",
                           settings=FeatureSettings(n_perm=50, max_themes=4, top_examples=2, seed=1))
    m = res.metrics_json()
    assert {k: m["base_L0"][f"type_{k}"] for k in "ABC"} == {"A": 1, "B": 1, "C": 1}
    assert {k: m["tuned_L0"][f"type_{k}"] for k in "ABC"} == {"A": 1, "B": 1, "C": 2}
    assert {k: m["delta_L0"][f"type_{k}"] for k in "ABC"} == {"A": 0, "B": 0, "C": 3}
    assert set(m["skipped_traits"]) == {"wry"} and "grade 3" in m["skipped_traits"]["wry"]
    assert "graded_calm_best_score" in m["tuned_L0"] and not any("wry" in k for k in m["tuned_L0"])
    assert {(r["source"], r["trait"]) for r in res.graded_rows} == {("base", "calm"), ("tuned", "calm")}
    assert res.enrichment["L0.k"] >= 2 and {r["by"] for r in res.enrichment_rows} == {"decoder", "text", "minilm"}
    assert res.examples_markdown().count("most cultural") == 3 and "L0" in res.themes_markdown()
