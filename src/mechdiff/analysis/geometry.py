"""Concept geometry under the causal inner product (Park et al. 2024, arXiv 2406.01506), per model and across a pair.

Unembedding side: the rows gamma(y) of the LM head are centred and whitened, g(y) = A (gamma(y) - mean gamma) with
A = Cov(gamma)^-1/2, so that the causal inner product is the Euclidean one on g (Cov(g) = I, checked). A concept W
(a set of single-token words) gets the vector l_W = (g_hat^T mu) g_hat, mu = mean g_w, g_hat = Sigma_w^+ mu
normalised, Sigma_w a Ledoit-Wolf covariance of the g_w (the LDA-style estimator; "mean" keeps mu as a baseline).

Embedding side (contexts): the final hidden state lambda(x) at a word's last token in a few short contexts, mapped
to the same space by l(x) = A^-T lambda(x) = Cov(gamma)^1/2 lambda(x) (so l^T g = lambda^T (gamma - mean)); the
same estimator over a concept's contexts gives its context vector. The unembedding is often untouched by a
fine-tune, so the context vectors are where a pair differs.

A direction v of the causal space acts on the final hidden state as lambda + alpha A^T v: the logit of y then moves
by alpha <v, g(y)> (plus a constant), which `token_effects` measures through the real LM head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site, capture, get_body, head_logits
from mechdiff.model.tokens import encode, right_pad

WORD_FORMS = (" {w}", "{w}", " {W}", "{W}")  # token forms of a word counted as its tokens (single tokens only)
CONTEXTS = ("The {w}", "I thought about the {w}", "Here is a picture of a {w}", "We talked about the {w}")


# ------------------------------------------------------------------------------------------------ the hierarchy


@dataclass
class Concept:
    """One node: a parent (words = all its children's words) or a child (parent = its parent's name)."""

    name: str
    parent: str | None
    words: list[str]

    @property
    def is_parent(self) -> bool:
        return self.parent is None


def hierarchy(concepts: dict) -> list[Concept]:
    """Parents then children of a concept hierarchy as `data.corpus.load_concepts` returns it
    ({"parents": {p: {"children": {c: [words]}}}}, validated there)."""
    parents, children = [], []
    for name, node in concepts["parents"].items():
        words: list[str] = []
        for c, ws in node["children"].items():
            children.append(Concept(f"{name}/{c}", name, list(ws)))
            words += [w for w in ws if w not in words]
        parents.append(Concept(name, None, words))
    return parents + children


# ------------------------------------------------------------------------------------------------ whitening


@dataclass
class Whitening:
    """g = (gamma - mean) @ A with A = Cov(gamma)^-1/2 (symmetric); A_inv = Cov(gamma)^1/2."""

    mean: np.ndarray
    A: np.ndarray
    A_inv: np.ndarray

    def apply(self, gamma: np.ndarray) -> np.ndarray:
        return (np.asarray(gamma, dtype=np.float64) - self.mean) @ self.A


def unembedding(model: nn.Module) -> np.ndarray:
    """The LM head's rows gamma(y) (V, d) as float64 (the tied input embedding when the model ties them)."""
    head = model.get_output_embeddings()
    w = getattr(head, "weight", None)
    if w is None or w.dim() != 2:
        raise MechdiffError(f"{type(model).__name__} has no linear LM head to read the unembedding from")
    return w.detach().double().cpu().numpy()


def whitening(gamma: np.ndarray, *, eps: float = 1e-10) -> Whitening:
    """The causal inner product's whitening of unembedding rows (V, d); raises when Cov(gamma) is singular."""
    G = np.asarray(gamma, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] <= G.shape[1]:
        raise MechdiffError(f"need more unembedding rows than dimensions to whiten, got shape {G.shape}")
    if not np.isfinite(G).all():
        raise MechdiffError("the unembedding contains NaN or inf: the model weights are broken")
    mean = G.mean(0)
    cov = np.cov(G, rowvar=False)
    w, V = np.linalg.eigh(cov)
    if w.min() <= eps * w.max():
        raise MechdiffError(f"Cov(unembedding) is singular (eigenvalues {w.min():.3g} .. {w.max():.3g}): the causal "
                            "inner product is undefined for this model")
    return Whitening(mean, (V / np.sqrt(w)) @ V.T, (V * np.sqrt(w)) @ V.T)


def identity_deviation(g: np.ndarray) -> float:
    """max |Cov(g) - I|: 0 for an exact whitening."""
    c = np.cov(np.asarray(g, dtype=np.float64), rowvar=False)
    return float(np.abs(c - np.eye(c.shape[0])).max())


# ------------------------------------------------------------------------------------------------ words -> tokens


def word_tokens(tokenizer, words: Sequence[str], forms: Sequence[str] = WORD_FORMS) -> dict[str, list[int]]:
    """{word: sorted single-token ids of its forms}; words with no single-token form are left out."""
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    unk = getattr(tokenizer, "unk_token_id", None)
    out: dict[str, list[int]] = {}
    for w in dict.fromkeys(words):
        ids = set()
        for f in forms:
            t = tokenizer(f.format(w=w, W=w[:1].upper() + w[1:]), add_special_tokens=False)["input_ids"]
            if len(t) == 1 and t[0] not in special and t[0] != unk:
                ids.add(int(t[0]))
        if ids:
            out[w] = sorted(ids)
    return out


def split_words(concepts: Sequence[Concept], covered: set[str], *, test_frac: float = 0.3, seed: int = 0
                ) -> dict[str, str]:
    """{word: "train" | "test"}: each child's covered words split ~70/30, seeded, at least one train word."""
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for c in concepts:
        if c.is_parent:
            continue
        ws = sorted(w for w in c.words if w in covered and w not in out)
        n_test = int(round(test_frac * len(ws))) if len(ws) > 1 else 0
        n_test = min(n_test, len(ws) - 1)
        test = set(rng.permutation(ws)[:n_test].tolist()) if n_test else set()
        out.update({w: ("test" if w in test else "train") for w in ws})
    return out


# ------------------------------------------------------------------------------------------------ estimator


# Ledoit-Wolf on two rows x1, x2 always picks shrinkage 0 (each centred outer product equals the sample
# covariance), leaving the rank-1 covariance (x1 - x2)(x1 - x2)^T / 4: the lda direction needs at least three.
LDA_MIN_ROWS = 3


def concept_vector(G: np.ndarray, method: str = "lda") -> np.ndarray:
    """The concept vector of the rows G (n, d) of one concept: "lda" (Park et al.) or "mean" (the plain mean).

    lda: mu = mean G, Sigma = Ledoit-Wolf covariance, g_hat = Sigma^+ mu / ||Sigma^+ mu||, l = (g_hat^T mu) g_hat.
    With fewer than `LDA_MIN_ROWS` rows, or a Ledoit-Wolf covariance that is not shrunk and has fewer rows than
    dimensions, Sigma is singular and the direction is undefined: lda returns the mean there (callers that
    compare estimators skip such concepts: `estimate`'s `min_tokens`).
    """
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] == 0:
        raise MechdiffError(f"a concept needs at least one vector, got shape {G.shape}")
    mu = G.mean(0)
    if method == "mean":
        return mu
    if method != "lda":
        raise MechdiffError(f"concept estimator must be 'lda' or 'mean', got {method!r}")
    if G.shape[0] < LDA_MIN_ROWS:
        return mu
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(store_precision=False, assume_centered=False).fit(G)  # the precision is not used
    if not lw.shrinkage_ > 1e-9 and G.shape[0] <= G.shape[1]:  # unshrunk sample covariance of rank < d: singular
        return mu
    sigma = lw.covariance_
    try:  # shrunk toward a scaled identity, Sigma is positive definite
        gh = np.linalg.solve(sigma, mu)
    except np.linalg.LinAlgError:
        gh = np.linalg.pinv(sigma, hermitian=True) @ mu
    n = np.linalg.norm(gh)
    if not n > 0:
        return mu
    gh /= n
    return float(gh @ mu) * gh


def angle(u: np.ndarray, v: np.ndarray) -> float:
    """Angle in degrees between two vectors (nan when one is zero)."""
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return float("nan")
    return float(np.degrees(np.arccos(np.clip(float(u @ v) / (nu * nv), -1.0, 1.0))))


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    return float(u @ v / (nu * nv)) if nu > 0 and nv > 0 else float("nan")


@dataclass
class ConceptSet:
    """Concepts with their token ids by split, and the vectors estimated from the train tokens."""

    concepts: list[Concept]
    train: dict[str, np.ndarray]  # concept -> token ids (train words)
    test: dict[str, np.ndarray]  # concept -> token ids (test words)
    split: dict[str, str] = field(default_factory=dict)  # word -> "train" | "test" (covered words only)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts if c.name in self.vectors]

    def parent_of(self, name: str) -> str | None:
        return next(c.parent for c in self.concepts if c.name == name)


def concept_tokens(concepts: Sequence[Concept], tokens: Mapping[str, list[int]], split: Mapping[str, str]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train and test token ids per concept (a parent holds its children's tokens)."""
    tr: dict[str, np.ndarray] = {}
    te: dict[str, np.ndarray] = {}
    for c in concepts:
        for which, out in (("train", tr), ("test", te)):
            ids = sorted({t for w in c.words if split.get(w) == which for t in tokens[w]})
            out[c.name] = np.asarray(ids, dtype=np.int64)
    return tr, te


def estimate(g: np.ndarray, cs: ConceptSet, method: str = "lda", min_tokens: int = LDA_MIN_ROWS
             ) -> dict[str, np.ndarray]:
    """Concept vectors from the rows of g (V, d) at each concept's train tokens (concepts with < min_tokens skipped;
    the default is the fewest rows the lda estimator can use, for every estimator, so that they cover the same
    concepts)."""
    return {c.name: concept_vector(g[cs.train[c.name]], method) for c in cs.concepts
            if len(cs.train[c.name]) >= min_tokens}


# ------------------------------------------------------------------------------------------------ orthogonality


def hierarchy_angles(vectors: Mapping[str, np.ndarray], concepts: Sequence[Concept]) -> list[dict]:
    """Angles (degrees) of l_parent with l_child - l_parent ("child") and with l_child1 - l_child2 ("sibling").

    `model_geometry` adds the level above: a root concept of all words, against l_parent - l_root."""
    rows = []
    for p in (c for c in concepts if c.is_parent and c.name in vectors):
        kids = [c.name for c in concepts if c.parent == p.name and c.name in vectors]
        lp = vectors[p.name]
        for k in kids:
            rows.append({"kind": "child", "parent": p.name, "child": k, "angle": angle(lp, vectors[k] - lp)})
        for i, a in enumerate(kids):
            for b in kids[i + 1:]:
                rows.append({"kind": "sibling", "parent": p.name, "child": f"{a} - {b.split('/')[-1]}",
                             "angle": angle(lp, vectors[a] - vectors[b])})
    return rows


def angle_summary(rows: Sequence[dict]) -> dict:
    """Median angle per kind, and the share of child angles within 80-100 degrees."""
    out: dict = {}
    for kind in ("child", "sibling"):
        a = np.array([r["angle"] for r in rows if r["kind"] == kind], dtype=np.float64)
        a = a[np.isfinite(a)]
        out[f"median_{kind}"] = float(np.median(a)) if a.size else None
        if kind == "child":
            out["share_80_100"] = float(np.mean((a >= 80) & (a <= 100))) if a.size else None
            out["n_child"] = int(a.size)
    return out


ORTHO_SHARE = 0.5  # hierarchical orthogonality holds on an estimate when at least this share of child angles is 80-100 deg
SEPARATION_MIN, SEPARATION_GAIN = 0.75, 0.2  # the concepts exist: held-out AUC at least this, and this above shuffled


def orthogonality_verdict(summary: Mapping) -> dict:
    """Whether hierarchical orthogonality holds, read from `model_geometry`'s summary and its controls.

    `estimator`: at least `ORTHO_SHARE` of the estimator's child angles lie within 80-100 degrees. `mean_estimator`:
    the same of the plain-mean control. The LDA estimator makes every token of a concept project onto its direction
    about as the mean does, and a child's tokens are some of its parent's, so its angle comes out near 90 degrees by
    construction, also for a planted hierarchy whose children lean along their parent (+-30 degrees off); the plain
    means show such a lean. `random_parents_breaks`: the random-parents control falls below that share. `separates`:
    the concept vectors pick out their held-out words (median AUC >= `SEPARATION_MIN`, and `SEPARATION_GAIN` above the
    shuffled-rows control): the angles alone pass on a shuffled unembedding too (a subset's mean is uncorrelated
    with its difference from the whole set's), so without concepts that exist they say nothing. `holds` = all four;
    a missing control counts as failed."""
    def ok(part: Mapping | None) -> bool:
        share = (part or {}).get("share_80_100")
        return share is not None and share >= ORTHO_SHARE

    controls = summary.get("controls") or {}
    auc = summary.get("separation_auc")
    auc_shuffled = (controls.get("shuffled") or {}).get("separation_auc")
    verdict = {"estimator": ok(summary), "mean_estimator": ok(controls.get("mean_estimator")),
               "random_parents_breaks": "random_parents" in controls and not ok(controls["random_parents"]),
               "separates": auc is not None and auc_shuffled is not None and auc >= SEPARATION_MIN
               and auc - auc_shuffled >= SEPARATION_GAIN}
    return {**verdict, "holds": all(verdict.values())}


RANDOM_PARENT_ANGLES = 24  # the random-parents control pools draws until it has at least this many child angles


def random_parent_draws(n_child: int) -> int:
    """How many random-parents draws the control pools for a hierarchy of `n_child` child angles: one when it has
    `RANDOM_PARENT_ANGLES` or more, else enough to reach that many. With a few parents a single draw's share within
    80-100 degrees is a handful of angles and reaches `ORTHO_SHARE` by chance (2 of 20 planted two-parent
    hierarchies read `holds: false` with one draw)."""
    return max(1, -(-RANDOM_PARENT_ANGLES // max(1, n_child)))


def random_parent_vectors(g: np.ndarray, cs: ConceptSet, method: str, seed: int,
                          draws: int = 1) -> list[dict[str, np.ndarray]]:
    """Control: each parent's vector from a random token set of the same size (children kept), in `draws`
    independent draws from one generator (the first draw is the same whatever their number)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        vecs = dict(cs.vectors)
        for c in cs.concepts:
            if c.is_parent and c.name in vecs:
                ids = rng.choice(g.shape[0], size=len(cs.train[c.name]), replace=False)
                vecs[c.name] = concept_vector(g[ids], method)
        out.append(vecs)
    return out


def separation(g: np.ndarray, cs: ConceptSet, *, n_random: int = 2000, seed: int = 0) -> list[dict]:
    """Per concept: ROC AUC of its test tokens' projections onto its vector against random tokens' projections."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    rows = []
    for name in cs.names:
        test = cs.test[name]
        if len(test) == 0:
            continue
        pool = np.setdiff1d(np.arange(g.shape[0]), np.concatenate([cs.train[name], test]))
        rnd = rng.choice(pool, size=min(n_random, len(pool)), replace=False)
        v = cs.vectors[name] / np.linalg.norm(cs.vectors[name])
        s = np.concatenate([g[test] @ v, g[rnd] @ v])
        y = np.concatenate([np.ones(len(test)), np.zeros(len(rnd))])
        rows.append({"concept": name, "auc": float(roc_auc_score(y, s)), "n_test": int(len(test))})
    return rows


def children_of(cs: ConceptSet, parent: str) -> list[str]:
    """The children of `parent` that have a vector and held-out tokens."""
    return [c.name for c in cs.concepts if c.parent == parent and c.name in cs.vectors and len(cs.test[c.name])]


def polytope(g: np.ndarray, cs: ConceptSet) -> list[dict]:
    """Per parent with >= 2 children that have a vector (and held-out words among them): its children's vectors
    as the vertices of a simplex (Park et al. 2024: a categorical concept is represented by the polytope of its
    elements' vectors).

    - `sv_ratio`: smallest over largest singular value of the (k, d) vertex matrix; > 0 when the k vertices are
      linearly independent, so that they span a (k-1)-simplex (0: a vertex is a combination of the others);
    - `accuracy`: each held-out token of a child, written by least squares as g(y) ~ sum_i beta_i l_i over the
      vertices l_i, goes to the vertex of largest beta_i; the share that goes to its own child, against `chance`
      1 / k;
    - `own_coord`: the median of those tokens' coordinate on their own vertex (1: a token sits at its vertex, as
      the estimator puts a concept's mean projection there; 0: its vertex plays no part in it)."""
    rows = []
    for p in (c.name for c in cs.concepts if c.is_parent):
        kids = [c.name for c in cs.concepts if c.parent == p and c.name in cs.vectors]  # the vertices
        if len(kids) < 2 or not any(len(cs.test[k]) for k in kids):
            continue
        V = np.stack([cs.vectors[k] for k in kids])  # (k, d)
        sv = np.linalg.svd(V, compute_uv=False)
        ids = np.concatenate([cs.test[k] for k in kids])
        own = np.concatenate([np.full(len(cs.test[k]), i) for i, k in enumerate(kids)])
        beta = np.linalg.lstsq(V.T, g[ids].T, rcond=None)[0].T  # (n, k)
        rows.append({"parent": p, "k": len(kids), "sv_ratio": float(sv[-1] / sv[0]) if sv[0] > 0 else 0.0,
                     "accuracy": float(np.mean(beta.argmax(1) == own)), "chance": 1.0 / len(kids),
                     "own_coord": float(np.median(beta[np.arange(len(ids)), own])), "n_test": int(len(ids))})
    return rows


def polytope_summary(rows: Sequence[dict]) -> dict:
    """Vertex accuracy and chance pooled over parents (each held-out token counts once); medians over parents of
    the singular-value ratio and the own-vertex coordinate."""
    n = np.array([r["n_test"] for r in rows], dtype=np.float64)
    if not n.sum():
        return {"parents": 0, "accuracy": None, "chance": None, "median_sv_ratio": None, "median_own_coord": None}
    pooled = {k: float(np.dot(n, [r[k] for r in rows]) / n.sum()) for k in ("accuracy", "chance")}
    return {"parents": len(rows), **pooled, "median_sv_ratio": median_of(rows, "sv_ratio"),
            "median_own_coord": median_of(rows, "own_coord")}


def cosine_matrix(vectors: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    V = np.stack([vectors[n] / np.linalg.norm(vectors[n]) for n in names])
    return V @ V.T


# ------------------------------------------------------------------------------------------------ contexts


def context_texts(words: Sequence[str], templates: Sequence[str] = CONTEXTS) -> tuple[list[str], list[str]]:
    """(texts, word of each text): every word in every template."""
    texts, owner = [], []
    for w in words:
        for t in templates:
            texts.append(t.format(w=w))
            owner.append(w)
    return texts, owner


def labelled_contexts(concepts: Sequence[Concept], parents: Sequence[str], split: Mapping[str, str]
                      ) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Contexts of every covered word of the given parents: (texts, word of each, parent index of each, whether
    the word is held out)."""
    words = {c.name: [w for w in c.words if w in split] for c in concepts if c.is_parent and c.name in parents}
    texts, owner = context_texts([w for n in parents for w in words[n]])
    label_of = {w: i for i, n in enumerate(parents) for w in words[n]}
    return texts, owner, np.array([label_of[w] for w in owner]), np.array([split[w] == "test" for w in owner])


@torch.no_grad()
def context_states(model: nn.Module, tokenizer, texts: Sequence[str], *, site: Site | None = None,
                   batch_size: int = 64) -> np.ndarray:
    """(n, d) float64 activations at each text's last token: the final (normed) hidden state when `site` is None,
    else the site's activation. Texts are encoded without a chat template (a BOS token is prepended)."""
    enc = encode(tokenizer, list(texts), chat=False, max_len=64)
    dev = next(model.parameters()).device
    chunks = []
    order = np.argsort(enc.lengths, kind="stable")
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        ids, mask = right_pad([enc.ids[r] for r in rows], enc.pad, dev)
        pos = torch.tensor([enc.decision[r] for r in rows], device=dev)
        if site is None:
            o = get_body(model)(input_ids=ids, attention_mask=mask, use_cache=False)
            h = (o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0])
        else:
            h = capture(model, ids, mask, [site])[0][site.name]
        chunks.append((rows, h[torch.arange(len(rows), device=dev), pos].double().cpu().numpy()))
    out = np.zeros((len(texts), chunks[0][1].shape[1]))
    for rows, h in chunks:
        out[rows] = h
    return out


def context_concepts(states: np.ndarray, owner: Sequence[str], cs: ConceptSet, method: str = "lda"
                     ) -> dict[str, np.ndarray]:
    """Concept vectors from context states (rows of `states`, word `owner[i]`) of each concept's train words."""
    train_words = {c.name: {w for w in c.words if cs.split.get(w) == "train"} for c in cs.concepts}
    word_rows: dict[str, list[int]] = {}
    for i, w in enumerate(owner):
        word_rows.setdefault(w, []).append(i)
    out = {}
    for n, words in train_words.items():
        rows = [i for w in words for i in word_rows.get(w, [])]
        if len(rows) >= LDA_MIN_ROWS:
            out[n] = concept_vector(states[rows], method)
    return out


# ------------------------------------------------------------------------------------------------ interventions


def set_shifts(logits0: torch.Tensor, logits1: torch.Tensor, token_sets: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean change of log p(y) over each token set between two (n, V) logit batches, relative to the mean change
    over the whole vocabulary (so a uniform logit shift counts 0)."""
    d = (torch.log_softmax(logits1.double(), -1) - torch.log_softmax(logits0.double(), -1)).mean(0)
    d = d - d.mean()
    return {k: float(d[torch.as_tensor(v, dtype=torch.long)].mean()) for k, v in token_sets.items() if len(v)}


@torch.no_grad()
def token_effects(model: nn.Module, hidden: torch.Tensor, shift: torch.Tensor, token_sets: Mapping[str, np.ndarray]
                  ) -> dict[str, float]:
    """`set_shifts` when `shift` (d,) is added to final hidden states (n, d)."""
    return set_shifts(head_logits(model, hidden), head_logits(model, hidden + shift.to(hidden.dtype)), token_sets)


def target_leakage(effects: Mapping[str, float], target: str) -> tuple[float, float]:
    """(effect, leakage) of a push toward `target`: effect = its token set's change minus the mean change of the
    other sets; leakage = mean positive change of the other sets over the target's change (0 = none leaks)."""
    if target not in effects:  # its token set is empty: nothing to measure
        return float("nan"), float("nan")
    others = [v for k, v in effects.items() if k != target]
    own = effects[target]
    effect = own - (float(np.mean(others)) if others else 0.0)
    leak = float(np.mean([max(v, 0.0) for v in others]) / own) if others and own > 0 else float("nan")
    return effect, leak


def final_norm_weight(model: nn.Module) -> np.ndarray | None:
    """The elementwise scale of the final norm before the LM head (None when the model has none: then no
    rescaling applies). Gemma-style RMSNorms scale by (1 + weight)."""
    body = get_body(model)
    for owner in (body, getattr(body, "decoder", None)):
        for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
            mod = getattr(owner, name, None)
            w = getattr(mod, "weight", None)
            if w is not None:
                w = w.detach().double().cpu().numpy()
                return 1.0 + w if type(mod).__name__.startswith("Gemma") else w
    return None


def hidden_direction(v: np.ndarray, wh: Whitening, norm_weight: np.ndarray | None) -> np.ndarray:
    """A causal-space vector as a residual-stream direction (unit norm): A^T v, divided elementwise by the final
    norm's weight (exact for the last layer's output up to the norm's scalar scale)."""
    u = wh.A @ np.asarray(v, dtype=np.float64)
    if norm_weight is not None:
        u = u / np.where(np.abs(norm_weight) > 1e-8, norm_weight, 1e-8)
    return u / np.linalg.norm(u)


def hidden_metric(wh: Whitening, norm_weight: np.ndarray | None) -> np.ndarray:
    """The causal inner product on residual-stream directions: M = diag(w) Cov(gamma) diag(w), so that
    <hidden_direction(v1), hidden_direction(v2)>_M is proportional to <v1, v2>."""
    cov = wh.A_inv @ wh.A_inv
    w = np.ones(cov.shape[0]) if norm_weight is None else norm_weight
    return cov * w[:, None] * w[None, :]


def intervention(model: nn.Module, hidden: torch.Tensor, directions: Mapping[str, np.ndarray],
                 token_sets: Mapping[str, np.ndarray], *, scale: float) -> list[dict]:
    """For each concept: add scale * median ||lambda|| * direction to the final hidden states; effect and leakage
    (`target_leakage`) over the concepts' token sets."""
    norm = float(hidden.norm(dim=1).median())
    rows = []
    for name, u in directions.items():
        eff = token_effects(model, hidden, torch.from_numpy(scale * norm * u).float(), token_sets)
        e, leak = target_leakage(eff, name)
        rows.append({"concept": name, "effect": e, "leakage": leak, "own": eff.get(name, float("nan"))})
    return rows


def child_interventions(model: nn.Module, hidden: torch.Tensor, cs: ConceptSet, wh: Whitening, *, scale: float
                        ) -> list[dict]:
    """Park et al.'s hierarchical claims as interventions on the final hidden states, per parent with >= 2
    children, over its children's held-out token sets (pushes of scale * median ||lambda||, as `intervention`):

    - a push along a child's delta l_child - l_parent: `effect` and `leakage` (`target_leakage`) over the
      siblings' sets, and `own_top` when its own set rises most;
    - the ratio of two siblings' probabilities, |change of log p(a) - change of log p(b)| (mean log-probability of
      each set, nats): under the parent's push (`ratio_parent`, median over sibling pairs: the parent vector
      should leave the ratios alone) and under the child's push (`ratio_child`, against each sibling: it should
      move them); `parent_up` is the siblings' mean change under the parent's push."""
    norm = float(hidden.norm(dim=1).median())

    def push(v: np.ndarray, sets: Mapping[str, np.ndarray]) -> dict[str, float]:
        return token_effects(model, hidden, torch.from_numpy(scale * norm * hidden_direction(v, wh, None)).float(),
                             sets)

    rows = []
    for p in (c.name for c in cs.concepts if c.is_parent and c.name in cs.vectors):
        kids = children_of(cs, p)
        if len(kids) < 2:
            continue
        sets = {k: cs.test[k] for k in kids}
        par = push(cs.vectors[p], sets)
        ratio_parent = float(np.median([abs(par[a] - par[b]) for i, a in enumerate(kids) for b in kids[i + 1:]]))
        for k in kids:
            eff = push(cs.vectors[k] - cs.vectors[p], sets)
            e, leak = target_leakage(eff, k)
            rows.append({"parent": p, "child": k, "effect": e, "leakage": leak,
                         "own_top": bool(eff[k] >= max(eff.values())),
                         "ratio_child": float(np.median([abs(eff[k] - eff[b]) for b in kids if b != k])),
                         "ratio_parent": ratio_parent, "parent_up": float(np.mean(list(par.values())))})
    return rows


def children_summary(rows: Sequence[dict]) -> dict:
    """Medians of the child pushes' effect and sibling-ratio change (over children), of the parent pushes'
    sibling-ratio change (over parents, each once), and the share of children whose own set rises most under
    their push."""
    if not rows:
        return {"children": 0}
    return {"children": len(rows), "median_effect": median_of(rows, "effect"),
            "share_own_top": float(np.mean([r["own_top"] for r in rows])),
            "median_ratio_parent": median_of(list({r["parent"]: r for r in rows}.values()), "ratio_parent"),
            "median_ratio_child": median_of(rows, "ratio_child")}


@torch.no_grad()
def site_interventions(model: nn.Module, tokenizer, prompts: Sequence[str], site: Site,
                       directions: Mapping[str, np.ndarray], token_sets: Mapping[str, np.ndarray], *, scale: float
                       ) -> list[dict]:
    """`intervention` at a residual-stream site: scale * median ||x|| * direction is added to the site's activation
    at each prompt's last token and the model runs on; effect and leakage from the next-token log-probabilities."""
    from mechdiff.model.sites import add_at

    enc = encode(tokenizer, list(prompts), chat=False, max_len=64)
    dev = next(model.parameters()).device
    ids, mask = right_pad(enc.ids, enc.pad, dev)
    pos = torch.tensor(enc.decision, device=dev)
    r = torch.arange(len(prompts), device=dev)

    def logits() -> torch.Tensor:
        o = get_body(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        h = o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]
        return head_logits(model, h[r, pos])

    clean = logits()
    norm = float(capture(model, ids, mask, [site])[0][site.name][r, pos].norm(dim=1).median())
    rows = []
    for name, u in directions.items():
        v = torch.from_numpy(scale * norm * np.asarray(u) / np.linalg.norm(u)).float().expand(len(prompts), -1)
        with add_at(model, site, pos, v):
            eff = set_shifts(clean, logits(), token_sets)
        e, leak = target_leakage(eff, name)
        rows.append({"concept": name, "effect": e, "leakage": leak, "own": eff.get(name, float("nan"))})
    return rows


def median_of(rows: Sequence[dict], key: str) -> float | None:
    a = np.array([r[key] for r in rows], dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else None


# ------------------------------------------------------------------------------------------------ one model


@dataclass
class Geometry:
    """Everything the geometry of one model gives: summaries (JSON), rows for plots, vectors for the H-SAE."""

    summary: dict
    angles: list[dict]
    separation: list[dict]
    interventions: list[dict]
    polytope: list[dict]  # per parent: its children as a simplex (`polytope`)
    child_interventions: list[dict]  # per child: its delta's push and the sibling ratios (`child_interventions`)
    vectors: dict[str, np.ndarray]  # unembedding-side concept vectors (causal space)
    context_vectors: dict[str, np.ndarray]  # context-side concept vectors (causal space)
    whitening: Whitening
    cs: ConceptSet


def model_geometry(model: nn.Module, tokenizer, concepts: Sequence[Concept], *, method: str = "lda",
                   test_frac: float = 0.3, seed: int = 0, prompts: Sequence[str] = (), steer_scale: float = 0.5,
                   min_tokens: int = LDA_MIN_ROWS, batch_size: int = 64) -> Geometry:
    """The causal geometry of one model: whitening check, concept vectors, orthogonality with controls,
    separation, the children's polytopes, parent and child interventions (on `prompts`) and context vectors."""
    gamma = unembedding(model)
    wh = whitening(gamma)
    g = wh.apply(gamma)
    all_words = sorted({w for c in concepts for w in c.words})
    toks = word_tokens(tokenizer, all_words)
    split = split_words(concepts, set(toks), test_frac=test_frac, seed=seed)
    tr, te = concept_tokens(concepts, toks, split)
    cs = ConceptSet(list(concepts), tr, te, split)
    cs.vectors = estimate(g, cs, method, min_tokens)
    if not any(c.is_parent for c in concepts if c.name in cs.vectors):
        raise MechdiffError(f"only {len(toks)} of {len(all_words)} concept words are single tokens of this "
                            "tokenizer, too few for any parent concept: add single-token words to the hierarchy")
    if not any(c.parent is not None for c in concepts if c.name in cs.vectors):
        raise MechdiffError(f"no child concept keeps {min_tokens} train tokens with test_frac {test_frac} of its "
                            "words held out: lower geometry.test_frac or give the children more single-token words")
    rows = hierarchy_angles(cs.vectors, concepts)
    summ: dict = {"whitening_deviation": identity_deviation(g),
                  "coverage": {"words": len(toks), "words_total": len(all_words),
                               "share": len(toks) / max(1, len(all_words)),
                               "concepts": len(cs.vectors), "concepts_total": len(concepts)},
                  "estimator": method, **angle_summary(rows)}
    # one level up: every concept word under a root ("thing"), each parent as its child
    root_ids = np.unique(np.concatenate([cs.train[c.name] for c in concepts if c.is_parent]))
    root = concept_vector(g[root_ids], method)
    up = [angle(root, cs.vectors[c.name] - root) for c in concepts if c.is_parent and c.name in cs.vectors]
    summ["median_parent_root"] = float(np.median(up))
    g_shuffled = g[np.random.default_rng(seed).permutation(g.shape[0])]  # tokens keep their sets, not their rows
    n_child = sum(r["kind"] == "child" for r in rows)
    controls = {  # each control's vector sets (the random parents pooled over draws when the hierarchy is small)
        "shuffled": [estimate(g_shuffled, cs, method, min_tokens)],
        "random_parents": random_parent_vectors(g, cs, method, seed, random_parent_draws(n_child)),
        "euclidean": [estimate(gamma - wh.mean, cs, method, min_tokens)],
        "mean_estimator": [estimate(g, cs, "mean", min_tokens)],
    }
    summ["controls"] = {}
    for name, draws in controls.items():
        r = [x for vecs in draws for x in hierarchy_angles(vecs, concepts)]
        summ["controls"][name] = angle_summary(r)
        if len(draws) > 1:
            summ["controls"][name]["draws"] = len(draws)
        rows += [{**x, "kind": f"{x['kind']}:{name}"} for x in r]
    sep = separation(g, cs, seed=seed)
    summ["separation_auc"] = median_of(sep, "auc")
    shuffled = ConceptSet(cs.concepts, cs.train, cs.test, cs.split, controls["shuffled"][0])
    summ["controls"]["shuffled"]["separation_auc"] = median_of(
        separation(g_shuffled, shuffled, seed=seed), "auc")
    summ["orthogonality"] = orthogonality_verdict(summ)
    poly = polytope(g, cs)
    summ["polytope"] = polytope_summary(poly)
    summ["controls"]["shuffled"]["polytope"] = polytope_summary(polytope(g_shuffled, shuffled))
    parents = [c.name for c in concepts if c.is_parent and c.name in cs.vectors and len(te[c.name])]
    inter: list[dict] = []
    kids: list[dict] = []
    if prompts and (len(parents) > 1 or poly):
        hidden = torch.from_numpy(context_states(model, tokenizer, prompts, batch_size=batch_size)).float()
        if len(parents) > 1:
            inter = intervention(model, hidden, {p: hidden_direction(cs.vectors[p], wh, None) for p in parents},
                                 {p: te[p] for p in parents}, scale=steer_scale)
            summ["intervention"] = {"median_effect": median_of(inter, "effect"),
                                    "median_leakage": median_of(inter, "leakage"),
                                    "share_own_up": float(np.mean([r["own"] > 0 for r in inter]))}
        kids = child_interventions(model, hidden, cs, wh, scale=steer_scale)
        summ["child_intervention"] = children_summary(kids)
    texts, owner = context_texts([w for w in all_words if w in split])
    states = context_states(model, tokenizer, texts, batch_size=batch_size) @ wh.A_inv
    ctx = context_concepts(states, owner, cs, method)
    summ["context"] = {"concepts": len(ctx),
                       "median_cos_to_unembedding": median_of(
                           [{"c": cosine(ctx[n], cs.vectors[n])} for n in ctx if n in cs.vectors], "c")}
    summ["context"].update({f"{k}": v for k, v in angle_summary(hierarchy_angles(ctx, concepts)).items()
                            if k.startswith("median")})
    return Geometry(summ, rows, sep, inter, poly, kids, cs.vectors, ctx, wh, cs)


# ------------------------------------------------------------------------------------------------ across the pair


def compare_pair(base: Geometry, tuned: Geometry) -> tuple[dict, list[dict]]:
    """Per concept: cosine of the base and tuned vectors (unembedding and context side), the context vector's
    relative shift ||l_t - l_b|| / ||l_b||, and the change of each child's orthogonality angle; the summary ranks
    the concepts by shift."""
    ang_b = {r["child"]: r["angle"] for r in hierarchy_angles(base.context_vectors, base.cs.concepts)
             if r["kind"] == "child"}
    ang_t = {r["child"]: r["angle"] for r in hierarchy_angles(tuned.context_vectors, tuned.cs.concepts)
             if r["kind"] == "child"}
    rows = []
    for c in base.cs.concepts:
        n = c.name
        if n not in base.context_vectors or n not in tuned.context_vectors:
            continue
        lb, lt = base.context_vectors[n], tuned.context_vectors[n]
        rows.append({
            "concept": n, "level": "parent" if c.is_parent else "child",
            "cos_unembedding": (cosine(base.vectors[n], tuned.vectors[n])
                                if n in base.vectors and n in tuned.vectors else None),
            "cos_context": cosine(lb, lt),
            "shift": float(np.linalg.norm(lt - lb) / max(np.linalg.norm(lb), 1e-12)),
            "angle_base": ang_b.get(n), "angle_tuned": ang_t.get(n),
        })
    order = sorted(rows, key=lambda r: -r["shift"])
    cu = [r["cos_unembedding"] for r in rows if r["cos_unembedding"] is not None]
    d_ang = [r["angle_tuned"] - r["angle_base"] for r in rows
             if r["angle_base"] is not None and r["angle_tuned"] is not None]
    summ = {
        "min_cos_unembedding": float(min(cu)) if cu else None,
        "median_cos_context": median_of(rows, "cos_context"),
        "median_shift": median_of(rows, "shift"),
        "median_abs_angle_change": float(np.median(np.abs(d_ang))) if d_ang else None,
        "most_moved": [r["concept"] for r in order[:5]],
        "most_moved_parent": next((r["concept"] for r in order if r["level"] == "parent"), None),
    }
    return summ, rows
