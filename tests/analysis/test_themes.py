"""Theme clustering: stability (ARI over seeds and bootstrap resamples), k by stability + silhouette, MiniLM."""

from itertools import combinations
from math import comb

import numpy as np
import pytest

from mechdiff.analysis.features import text_themes, text_themes_markdown, theme_enrichment, themes
from mechdiff.analysis.themes import (
    choose_k,
    cluster_kmeans,
    embed_texts,
    kmeans_stability,
    minilm_dir,
    pair_ari,
)
from mechdiff.errors import MechdiffError


def _hand_ari(a, b) -> float:
    """Hubert & Arabie's adjusted Rand index from the contingency table, written out."""
    a, b = list(a), list(b)
    n = len(a)
    pairs = lambda counts: sum(comb(c, 2) for c in counts)  # noqa: E731
    cells = pairs([sum(1 for x, y in zip(a, b) if (x, y) == (i, j)) for i in set(a) for j in set(b)])
    rows, cols = pairs([a.count(i) for i in set(a)]), pairs([b.count(j) for j in set(b)])
    expected = rows * cols / comb(n, 2)
    return (cells - expected) / ((rows + cols) / 2 - expected)


def test_pair_ari_matches_hand_formula_and_sklearn():
    from sklearn.metrics import adjusted_rand_score

    a = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    b = [1, 1, 0, 0, 2, 2, 2, 2, 0, 0]
    # pair count by hand: cells 1+1+1+1 = 4... checked by the formula and by sklearn
    assert pair_ari(a, b) == pytest.approx(_hand_ari(a, b), abs=1e-12)
    assert pair_ari(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    assert pair_ari(a, [5, 5, 5, 7, 7, 7, 9, 9, 9, 9]) == 1.0  # relabelled: same partition
    with pytest.raises(MechdiffError):
        pair_ari([0, 1], [0, 1, 1])


def _blobs(n_per: int = 60, k: int = 4, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:k] * 6
    truth = np.repeat(np.arange(k), n_per)
    return centres[truth] + rng.normal(0, 0.4, (truth.size, d)), truth


def test_planted_clusters_are_stable_with_the_right_k():
    X, truth = _blobs()
    res = cluster_kmeans(X, range(2, 7), seed=3, n_seeds=2, n_boot=2, stable_ari=0.8)
    assert res["k"] == 4 and res["stable"] is True
    assert pair_ari(truth, res["labels"]) == pytest.approx(1.0)
    assert res["stability"][4] == pytest.approx(1.0) and res["ari_seeds"][4] == res["ari_boot"][4] == 1.0
    # the subsampled estimate (fewer points than rows) sees the same planted structure
    st = kmeans_stability(X, 4, res["labels"], seed=3, n_seeds=2, n_boot=2, max_points=100)
    assert st["stability"] == pytest.approx(1.0)
    # deterministic given the seed
    again = cluster_kmeans(X, range(3, 6), seed=3, n_seeds=2, n_boot=2, stable_ari=0.8)
    assert again["stability"][4] == res["stability"][4] and np.array_equal(again["labels"], res["labels"])


def test_uniform_noise_is_unstable_and_flagged():
    rng = np.random.default_rng(1)
    X = rng.uniform(size=(240, 10))
    res = cluster_kmeans(X, range(3, 9), seed=0, n_seeds=3, n_boot=3, stable_ari=0.8)
    assert res["stable"] is False
    assert max(res["stability"].values()) < 0.8
    assert res["k"] == max(res["stability"], key=res["stability"].get)  # the most stable k is reported
    assert res["silhouette"][res["k"]] < 0.2


def test_silhouette_on_a_row_sample_matches_sklearn_dense_and_sparse():
    # cluster_kmeans computes the sampled rows' distances once for every k; sklearn draws and measures per k
    from scipy import sparse
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(3)
    dense = rng.normal(0, 1, (300, 6)) + np.repeat(np.eye(6)[:3] * 3, 100, axis=0)
    for X in (dense, sparse.csr_matrix(np.where(dense > 0.5, dense, 0.0))):
        res = cluster_kmeans(X, range(2, 5), seed=5, max_silhouette_samples=120, n_seeds=0, n_boot=1)
        for k in range(2, 5):
            labels = KMeans(n_clusters=k, n_init=4, random_state=5).fit(X).labels_
            assert res["silhouette"][k] == pytest.approx(
                silhouette_score(X, labels, sample_size=120, random_state=5), abs=1e-12)


def test_choose_k_rule():
    sil = {2: 0.30, 3: 0.50, 4: 0.40}
    assert choose_k(sil, {2: 0.95, 3: 0.60, 4: 0.90}, 0.8) == (4, True)  # best silhouette among the stable
    assert choose_k(sil, {2: 0.50, 3: 0.70, 4: 0.70}, 0.8) == (3, False)  # none stable: most stable, tie by silhouette
    assert choose_k(sil, {2: None, 3: None, 4: None}, 0.8) == (3, None)  # nothing measured: silhouette alone


def test_themes_and_text_themes_report_stability():
    X, truth = _blobs(n_per=30, k=3, d=16, seed=2)
    res = themes(X, k_range=range(2, 7), seed=0, n_seeds=2, n_boot=2)
    assert res["k"] == 3 and res["stable"] and pair_ari(truth, res["labels"]) == 1.0
    rng = np.random.default_rng(4)
    res = themes(rng.normal(size=(150, 12)), k_range=range(3, 7), seed=0, n_seeds=2, n_boot=2)
    assert res["stable"] is False
    with pytest.raises(MechdiffError, match="n_seeds"):
        themes(X, k_range=range(2, 4), n_seeds=-1)


# ---------------------------------------------------------------- MiniLM


def test_minilm_dir_is_the_packaged_model():
    d = minilm_dir()
    assert (d / "model.safetensors").is_file() and (d / "1_Pooling" / "config.json").is_file()


@pytest.fixture(scope="module")
def minilm_texts():
    return ["A man is playing a guitar.", "Someone plays the guitar on stage.",
            "The stock market fell sharply today.", "Share prices dropped steeply this morning.",
            "A cat sleeps on the warm windowsill."]


def test_embed_texts_matches_sentence_transformers_pooling(minilm_texts):
    import torch
    from transformers import AutoModel, AutoTokenizer

    E = embed_texts(minilm_texts, batch_size=2)
    assert E.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-12)
    # independent reference: one text at a time (no padding), the mean of the hidden states in numpy, unit length
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModel.from_pretrained(minilm_dir()).eval()
    for i, t in enumerate(minilm_texts):
        with torch.no_grad():
            h = model(**tok(t, return_tensors="pt")).last_hidden_state[0].numpy().astype(np.float64)
        v = h.mean(0)
        np.testing.assert_allclose(E[i], v / np.linalg.norm(v), atol=2e-5)
    # and the sentence-transformers library itself (the package's own dependency) on the same folder
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode(minilm_texts, normalize_embeddings=True)
    np.testing.assert_allclose(E, ref, atol=2e-5)


def test_embed_texts_paraphrases_are_closer(minilm_texts):
    E = embed_texts(minilm_texts)
    C = E @ E.T
    assert C[0, 1] > 0.6 and C[2, 3] > 0.6
    for i, j in combinations(range(5), 2):
        if {i, j} not in ({0, 1}, {2, 3}):
            assert C[i, j] < min(C[0, 1], C[2, 3]) - 0.2


def test_text_themes_minilm_recovers_planted_topics():
    # three topics in disjoint words AND meaning: MiniLM must separate them as TF-IDF does
    topics = [["The chef cooked rice with curry and spices.", "Fresh bread and cheese were served for lunch.",
               "She made a hot noodle soup for dinner.", "Dumplings steamed in the kitchen."],
              ["He played a melody on the violin.", "The choir sang a song with the piano.",
               "Drums kept the rhythm of the band.", "She strummed her guitar at the concert."],
              ["The striker scored a goal in the stadium.", "They watched the cricket match all day.",
               "The referee stopped the football game.", "She won the tennis final with her racket."]]
    texts = [t for ts in topics for t in ts]
    topic = np.repeat([0, 1, 2], 4)
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], 20)
    A = np.zeros((12, 60))
    for j, t in enumerate(truth):
        on = rng.choice(np.flatnonzero(topic == t), 3, replace=False)
        A[on, j] = rng.uniform(1, 3, 3)
    res = text_themes(A, texts, top_n=3, k_range=range(2, 6), seed=0, embedding="minilm", n_seeds=2, n_boot=2)
    assert res["embedding"] == "minilm" and res["k"] == 3 and res["stable"]
    assert pair_ari(truth, res["labels"]) == pytest.approx(1.0)
    assert res["centroids"].shape == (3, 384)
    rows = theme_enrichment(res["labels"], np.arange(60) < 10, ignore_label=-1)
    md = text_themes_markdown(res, rows, title="L1")
    assert "MiniLM" in md and "stability ARI 1.00" in md and "Stable:" in md
    with pytest.raises(MechdiffError, match="embedding"):
        text_themes(A, texts, embedding="bert")
    with pytest.raises(MechdiffError, match="text vectors"):
        text_themes(A, texts, embedding="minilm", text_vectors=np.ones((3, 4)))


def test_unstable_text_themes_say_not_stable():
    rng = np.random.default_rng(3)
    words = [f"w{i}x" for i in range(40)]
    texts = [" ".join(rng.choice(words, 6)) for _ in range(40)]
    A = rng.uniform(0, 1, (40, 120)) * (rng.uniform(size=(40, 120)) < 0.3)
    res = text_themes(A, texts, top_n=5, k_range=range(3, 7), seed=0, n_seeds=2, n_boot=2)
    assert res["stable"] is False
    md = text_themes_markdown(res, theme_enrichment(res["labels"], np.arange(120) < 40, ignore_label=-1))
    assert "not stable" in md and "**Not stable**" in md
