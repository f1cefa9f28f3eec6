"""Probes (seed 001 stages 4-5): what a model's hidden states (or input embeddings) linearly encode, layer by layer.

Three strategies, as the seed: hidden -> concept (cultural vs control; each trait's graded 0-3 label),
hidden -> feature (regress an SAE's per-prompt feature activations from the hidden state) and
embedding -> feature (the same targets from the mean input embedding of the prompt's tokens). Every probe is a
scikit-learn estimator: grouped k-fold cross-validation on the train split (no prompt family in two folds), then
one fit on all of train scored on the held-out test split. `probe_by_layer` runs the tasks at every site for
base and tuned. Also the SAEBench quality metrics of an SAE: sparse probing (top-k latents by
|mean_pos - mean_neg| on train, L2 logistic regression on those k) and the relative reconstruction bias
E||x_hat||^2 / E<x, x_hat> (1 = unbiased, < 1 = shrinkage).

Estimators (`make_estimator`): logistic (LogisticRegression, L2), ridge (RidgeClassifier / Ridge), forest
(RandomForest*) and svm (SVC / SVR, RBF); linear ones and the SVM behind a StandardScaler. A classification
score is accuracy, a regression score R^2 (averaged over outputs). The library never reads params.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from mechdiff.errors import MechdiffError
from mechdiff.stats.checks import matrix

ESTIMATORS = ("logistic", "ridge", "forest", "svm")
KINDS = ("classify", "regress")
STRATEGIES = ("hidden->concept", "hidden->feature", "embedding->feature")


@dataclass(frozen=True)
class ProbeSettings:
    """How probes are fitted: CV folds, L2 strengths, forest size, seed, worker processes (`probe_by_layer` runs its
    sites in that many; a random forest fitted alone uses them for its trees)."""

    folds: int = 5
    C: float = 1.0            # logistic regression (and SVC) inverse L2 strength
    ridge_alpha: float = 1.0  # ridge L2 strength
    n_trees: int = 50
    seed: int = 0
    n_jobs: int = 1
    max_iter: int = 2000


@dataclass
class ProbeResult:
    """Grouped CV scores on train, the score of one fit on all of train on test (and its train score)."""

    cv_scores: np.ndarray
    test: float
    train: float
    n_train: int
    n_test: int
    spearman: float | None = None  # graded labels: Spearman of the test predictions with the true labels

    @property
    def cv_mean(self) -> float:
        return float(np.mean(self.cv_scores))

    @property
    def cv_sd(self) -> float:
        return float(np.std(self.cv_scores, ddof=1)) if len(self.cv_scores) > 1 else 0.0


# ------------------------------------------------------------------------------------------- estimators


@contextlib.contextmanager
def one_blas_thread():
    """Single-threaded BLAS while probes fit: the probes' matrices are small, and threaded BLAS on a shared machine
    made each L-BFGS iteration ~30x slower (measured: 0.9 s vs 0.03 s for one 616 x 576 logistic regression)."""
    import scipy.optimize  # noqa: F401  (load every BLAS the fits use before limiting it)
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield



def make_estimator(name: str, kind: str, settings: ProbeSettings = ProbeSettings()):
    """An unfitted scikit-learn estimator: `name` in ESTIMATORS, `kind` classify | regress."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.linear_model import LogisticRegression, Ridge, RidgeClassifier
    from sklearn.multioutput import MultiOutputRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR

    if kind not in KINDS:
        raise MechdiffError(f"probe kind {kind!r}: choose classify or regress")
    s = settings
    if name == "logistic":
        if kind == "regress":
            raise MechdiffError("logistic regression is a classifier: regress with ridge, forest or svm")
        return make_pipeline(StandardScaler(), LogisticRegression(C=s.C, max_iter=s.max_iter))
    if name == "ridge":
        return make_pipeline(StandardScaler(), (RidgeClassifier if kind == "classify" else Ridge)(alpha=s.ridge_alpha))
    if name == "forest":
        cls = RandomForestClassifier if kind == "classify" else RandomForestRegressor
        return cls(n_estimators=s.n_trees, max_features="sqrt", random_state=s.seed, n_jobs=s.n_jobs)
    if name == "svm":
        if kind == "classify":
            return make_pipeline(StandardScaler(), SVC(C=s.C, kernel="rbf", random_state=s.seed))
        return make_pipeline(StandardScaler(), MultiOutputRegressor(SVR(C=s.C, kernel="rbf")))
    raise MechdiffError(f"unknown probe estimator {name!r}: choose one of {', '.join(ESTIMATORS)}")


def curve_estimator(kind: str) -> str:
    """The estimator of the layer curves: logistic regression for concepts, ridge for features."""
    return "logistic" if kind == "classify" else "ridge"


# ------------------------------------------------------------------------------------------- grouped CV


def _check_xy(X, y, what: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    X = matrix(X, f"{what} inputs")
    y = np.asarray(y)
    if y.shape[0] != X.shape[0]:
        raise MechdiffError(f"{what}: {X.shape[0]} input rows but {y.shape[0]} targets")
    if kind == "regress":
        y = np.asarray(y, dtype=np.float64)
        if not np.isfinite(y).all():
            raise MechdiffError(f"{what} targets contain NaN or inf")
    elif len(np.unique(y)) < 2:
        raise MechdiffError(f"{what} labels have a single class ({np.unique(y).tolist()}): a probe needs two or more")
    return X, y


def group_folds(y: np.ndarray, groups: Sequence, *, kind: str, folds: int = 5, seed: int = 0
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped CV folds (train, validation index arrays): StratifiedGroupKFold for classes, GroupKFold for
    regression targets; no group is on both sides of a fold."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise MechdiffError(f"{n_groups} prompt families in the train split, fewer than {folds} CV folds: "
                            "lower probes.folds or add prompts")
    if kind == "classify":
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # "least populated class has fewer members than n_splits" for tiny tasks
            warnings.simplefilter("ignore", UserWarning)
            return [(a, b) for a, b in cv.split(np.zeros(len(y)), y, groups)]
    return [(a, b) for a, b in GroupKFold(n_splits=folds).split(np.zeros(len(y)), y, groups)]


def _score(est, X: np.ndarray, y: np.ndarray, kind: str) -> float:
    from sklearn.metrics import accuracy_score, r2_score

    pred = est.predict(X)
    return float(accuracy_score(y, pred) if kind == "classify" else r2_score(y, pred))


def probe(X_train, y_train, groups_train: Sequence, X_test, y_test, *, kind: str, estimator: str | None = None,
          settings: ProbeSettings = ProbeSettings(), graded: bool = False) -> ProbeResult:
    """Grouped `settings.folds`-fold CV of `estimator` on train (sklearn's cross_val_score on `group_folds`), then
    one fit on all of train scored on test. Accuracy for classify, R^2 (uniform over outputs) for regress;
    `graded` adds the Spearman correlation of the test predictions with the (ordinal) test labels."""
    from scipy.stats import spearmanr
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    X_train, y_train = _check_xy(X_train, y_train, "probe train", kind)
    X_test = matrix(X_test, "probe test inputs")
    y_test = np.asarray(y_test, dtype=np.float64) if kind == "regress" else np.asarray(y_test)
    if X_test.shape[1] != X_train.shape[1] or len(y_test) != len(X_test):
        raise MechdiffError(f"probe test set has shape {X_test.shape} with {len(y_test)} targets; train inputs have "
                            f"{X_train.shape[1]} columns")
    if len(groups_train) != len(X_train):
        raise MechdiffError(f"probe: {len(groups_train)} groups for {len(X_train)} train rows")
    est = make_estimator(estimator or curve_estimator(kind), kind, settings)
    folds = group_folds(y_train, groups_train, kind=kind, folds=settings.folds, seed=settings.seed)
    with warnings.catch_warnings(), one_blas_thread():
        warnings.simplefilter("ignore", UserWarning)
        cv = cross_val_score(clone(est), X_train, y_train, cv=folds,
                             scoring="accuracy" if kind == "classify" else "r2")
        fitted = clone(est).fit(X_train, y_train)
    rho = None
    if graded and len(y_test) > 2:
        pred = fitted.predict(X_test)
        if np.ptp(pred) > 0 and np.ptp(y_test) > 0:
            rho = float(spearmanr(y_test, pred).statistic)
    return ProbeResult(cv_scores=np.asarray(cv, dtype=np.float64),
                       test=_score(fitted, X_test, y_test, kind) if len(y_test) else float("nan"),
                       train=_score(fitted, X_train, y_train, kind), n_train=len(X_train), n_test=len(X_test),
                       spearman=rho)


# ------------------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One probing task over store rows (= prompts): train / test rows, train groups, per-model targets.

    `y_train` / `y_test` map a model name to its targets (concept labels are the same for both models; feature
    targets are each model's own SAE features)."""

    name: str
    strategy: str
    kind: str
    train: np.ndarray
    test: np.ndarray
    groups: np.ndarray
    y_train: dict[str, np.ndarray]
    y_test: dict[str, np.ndarray]
    graded: bool = False
    info: dict = field(default_factory=dict)

    def chance(self, model: str) -> float | None:
        """Majority-class share of the test labels (classification), None for regression."""
        if self.kind != "classify" or not len(self.y_test[model]):
            return None
        _, counts = np.unique(self.y_test[model], return_counts=True)
        return float(counts.max() / counts.sum())


def check_disjoint_groups(groups_train: Iterable, groups_test: Iterable, what: str = "probe") -> None:
    """Raise unless no prompt family is in both the train and the test split."""
    both = sorted(set(map(str, groups_train)) & set(map(str, groups_test)))
    if both:
        raise MechdiffError(f"{what}: prompt family {both[0]!r} (and {len(both) - 1} more) is in both train and test: "
                            "re-run prepare (splits must be grouped)")


def _rows(prompts: Sequence, keep: Callable, split: str) -> np.ndarray:
    return np.array([i for i, q in enumerate(prompts) if q.split == split and keep(q)], dtype=np.int64)


def concept_tasks(prompts: Sequence, *, target: str = "cultural", control: str = "control",
                  models: Sequence[str] = ("base", "tuned"), min_train: int = 10, folds: int = 5
                  ) -> tuple[list[Task], dict[str, str]]:
    """hidden -> concept tasks over `prompts` (in store row order): `target` vs `control` (binary, 1 = target) and
    one graded task per trait (label 0-3 of the trait prompts). Returns (tasks, {skipped task: why}); a task is
    skipped when its train split cannot make `folds` grouped, stratified folds (a class or the prompt families
    fewer than `folds`)."""
    tasks, skipped = [], {}

    def add(name: str, keep: Callable, label: Callable, graded: bool) -> None:
        tr, te = _rows(prompts, keep, "train"), _rows(prompts, keep, "test")
        y_tr = np.array([label(prompts[i]) for i in tr], dtype=np.int64)
        y_te = np.array([label(prompts[i]) for i in te], dtype=np.int64)
        if len(tr) < min_train or len(te) == 0 or len(np.unique(y_tr)) < 2:
            skipped[name] = f"{len(tr)} train / {len(te)} test prompts, train classes {np.unique(y_tr).tolist()}"
            return
        g_tr = np.array([prompts[i].group for i in tr])
        fam = min(len(np.unique(g_tr[y_tr == c])) for c in np.unique(y_tr))
        if fam < folds:
            skipped[name] = f"a class has prompts of only {fam} families in train, fewer than {folds} CV folds"
            return
        check_disjoint_groups(g_tr, [prompts[i].group for i in te], name)
        tasks.append(Task(name, "hidden->concept", "classify", tr, te, g_tr, {m: y_tr for m in models},
                          {m: y_te for m in models}, graded=graded))

    add(f"{target}_vs_{control}", lambda q: q.dataset in (target, control), lambda q: int(q.dataset == target), False)
    for trait in sorted({q.trait for q in prompts if q.trait and q.label >= 0}):
        add(f"trait:{trait}", lambda q, t=trait: q.trait == t and q.label >= 0, lambda q: q.label, True)
    return tasks, skipped


def top_variance_features(F_train: np.ndarray, n: int) -> np.ndarray:
    """The n features (columns) of largest variance over the train prompts, live ones only (variance > 0)."""
    F_train = matrix(F_train, "feature activations")
    var = F_train.var(axis=0)
    order = np.argsort(-var, kind="stable")
    live = order[var[order] > 0][:n]
    if len(live) == 0:
        raise MechdiffError("every SAE feature is constant over the train prompts: no feature targets to probe")
    return live


def feature_task(prompts: Sequence, features: Mapping[str, np.ndarray], *, n_features: int,
                 strategy: str = "hidden->feature", name: str = "sae_features") -> Task:
    """A regression task over all prompts: predict, per model, the `n_features` features of largest train
    variance of that model's per-prompt SAE activations (`features[model]`, (n_prompts, width))."""
    tr, te = _rows(prompts, lambda q: True, "train"), _rows(prompts, lambda q: True, "test")
    if len(tr) == 0 or len(te) == 0:
        raise MechdiffError(f"feature probes need train and test prompts, got {len(tr)} train and {len(te)} test")
    g_tr = np.array([prompts[i].group for i in tr])
    check_disjoint_groups(g_tr, [prompts[i].group for i in te], name)
    y_tr, y_te, info = {}, {}, {}
    for m, F in features.items():
        if len(F) != len(prompts):
            raise MechdiffError(f"{len(F)} rows of {m} SAE features for {len(prompts)} prompts")
        cols = top_variance_features(F[tr], n_features)
        y_tr[m], y_te[m] = F[tr][:, cols], F[te][:, cols]
        info[m] = cols.tolist()
    return Task(name, strategy, "regress", tr, te, g_tr, y_tr, y_te, info={"features": info})


def mean_token_embeddings(E: np.ndarray, tok_id: np.ndarray, tok_prompt: np.ndarray, tok_pos: np.ndarray,
                          n_prompts: int, *, first: int = 1) -> np.ndarray:
    """Per-prompt mean of the input embeddings E[tok_id] over each prompt's tokens (token rows of a store:
    `tok_id`, owning prompt `tok_prompt`, position `tok_pos`) from position `first` on (give the store's
    `sae.sources.first_position`: the same tokens as the per-prompt SAE feature means)."""
    keep = tok_pos >= int(first)
    ids, owner = tok_id[keep].astype(np.int64), tok_prompt[keep].astype(np.int64)
    if len(ids) and (ids.max() >= len(E) or ids.min() < 0):
        raise MechdiffError(f"token id {int(ids.max())} outside the embedding matrix ({len(E)} rows)")
    counts = np.bincount(owner, minlength=n_prompts)
    if (counts == 0).any():
        raise MechdiffError(f"prompt row {int(np.flatnonzero(counts == 0)[0])} has no tokens to embed")
    out = np.zeros((n_prompts, E.shape[1]), dtype=np.float64)
    np.add.at(out, owner, np.asarray(E, dtype=np.float64)[ids])
    return out / counts[:, None]


# ------------------------------------------------------------------------------------------- by layer


def probe_by_layer(tasks: Sequence[Task], sites: Sequence[str], read: Callable[[str, str], np.ndarray], *,
                   models: Sequence[str] = ("base", "tuned"), compare_sites: Sequence[str] = (),
                   estimators: Sequence[str] = ESTIMATORS, settings: ProbeSettings = ProbeSettings(),
                   layer_of: Callable[[str], int] | None = None, progress: bool = False) -> list[dict]:
    """Run every task at every site for every model: the curve estimator everywhere, every estimator of
    `estimators` at `compare_sites`. `read(model, site)` gives the (n_prompts, d) inputs in row order (a site may
    be any key, e.g. 'embedding'). Rows: task, strategy, model, site, layer, estimator, cv_mean, cv_sd, test, ...
    With `settings.n_jobs` > 1 the (model, site) pairs run in that many worker processes, in the same order and
    with the same results."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    jobs = [(m, s) for s in sites for m in models]
    workers = min(int(settings.n_jobs), len(jobs))
    inner = replace(settings, n_jobs=1) if workers > 1 else settings
    args = ((read(m, s), tasks, m, s, s in compare_sites, estimators, inner, layer_of(s) if layer_of else None)
            for m, s in jobs)  # read lazily (one job per worker ahead), not every site's matrix at once
    if workers > 1:  # same fits, same results: each fit runs on one BLAS thread either way (`probe`)
        out = Parallel(n_jobs=workers, backend="loky", return_as="generator", pre_dispatch="n_jobs")(
            delayed(_site_rows)(*a) for a in args)
    else:
        out = (_site_rows(*a) for a in args)
    rows: list[dict] = []
    for got in tqdm(out, total=len(jobs), desc="probes", disable=not progress, leave=False):
        rows += got
    return rows


def _site_rows(X: np.ndarray, tasks: Sequence[Task], m: str, s: str, compare: bool, estimators: Sequence[str],
               settings: ProbeSettings, layer: int | None) -> list[dict]:
    """Every task's probe rows of one model at one site (`probe_by_layer`'s unit of work)."""
    rows = []
    for t in tasks:
        ests = [curve_estimator(t.kind)]
        if compare:
            ests += [e for e in estimators if e not in ests and not (e == "logistic" and t.kind == "regress")]
        for e in ests:
            r = probe(X[t.train], t.y_train[m], t.groups, X[t.test], t.y_test[m], kind=t.kind, estimator=e,
                      settings=settings, graded=t.graded)
            rows.append({"task": t.name, "strategy": t.strategy, "model": m, "site": s, "layer": layer,
                         "estimator": e, "cv_mean": r.cv_mean, "cv_sd": r.cv_sd, "test": r.test, "train": r.train,
                         "spearman": r.spearman, "n_train": r.n_train, "n_test": r.n_test})
    return rows


def shuffled_control(task: Task, X: np.ndarray, model: str, *, settings: ProbeSettings = ProbeSettings()) -> float:
    """Test score of the curve estimator trained on permuted train labels (a selectivity control: ~chance)."""
    rng = np.random.default_rng(settings.seed)
    y = task.y_train[model][rng.permutation(len(task.train))]
    return probe(X[task.train], y, task.groups, X[task.test], task.y_test[model], kind=task.kind,
                 settings=settings).test


def summarise(rows: Sequence[dict], tasks: Sequence[Task], *, models: Sequence[str] = ("base", "tuned"),
              compare_sites: Sequence[str] = ()) -> dict:
    """Headline numbers per task: each model's best layer by CV mean (curve estimator) with its CV and test score,
    tuned - base test score at the best layers and the layer where the test curves differ most, and every
    estimator's test score at the compare sites."""
    out = {}
    for t in tasks:
        cur = [r for r in rows if r["task"] == t.name and r["estimator"] == curve_estimator(t.kind)]
        d: dict = {"strategy": t.strategy, "metric": "accuracy" if t.kind == "classify" else "r2",
                   "n_train": len(t.train), "n_test": len(t.test), "chance": t.chance(models[0])}
        for m in models:
            mine = [r for r in cur if r["model"] == m]
            if not mine:
                continue
            best = max(mine, key=lambda r: r["cv_mean"])
            d[m] = {"best_site": best["site"], "best_layer": best["layer"], "cv_mean": best["cv_mean"],
                    "cv_sd": best["cv_sd"], "test": best["test"], "spearman": best["spearman"]}
        if len(models) == 2 and all(m in d for m in models):
            a, b = models
            d["diff_best_test"] = d[b]["test"] - d[a]["test"]
            by_site = {r["site"]: r for r in cur if r["model"] == a}
            diffs = [(r["test"] - by_site[r["site"]]["test"], r) for r in cur if r["model"] == b and r["site"] in by_site]
            if diffs:
                diff, r = max(diffs, key=lambda x: abs(x[0]))
                d["max_abs_diff"] = {"site": r["site"], "layer": r["layer"], "diff": diff}
        comp = {}
        for s in compare_sites:
            for r in rows:
                if r["task"] == t.name and r["site"] == s:
                    comp.setdefault(s, {}).setdefault(r["estimator"], {})[r["model"]] = r["test"]
        if comp:
            d["estimators"] = comp
        out[t.name] = d
    return out


# ------------------------------------------------------------------------------------------- SAE quality


def top_k_latents(Z_train: np.ndarray, y_train: np.ndarray, k: int) -> np.ndarray:
    """SAEBench's selection: the k latents of largest |mean over positives - mean over negatives| (ties: lower index)."""
    Z_train = matrix(Z_train, "SAE latents")
    y = np.asarray(y_train)
    if set(np.unique(y).tolist()) != {0, 1}:
        raise MechdiffError(f"sparse probing needs binary 0/1 labels with both classes, got {np.unique(y).tolist()}")
    if not 1 <= k <= Z_train.shape[1]:
        raise MechdiffError(f"sparse probing k = {k} outside 1..{Z_train.shape[1]} latents")
    diff = np.abs(Z_train[y == 1].mean(0) - Z_train[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def sparse_probe(Z_train, y_train, Z_test, y_test, *, ks: Sequence[int] = (1, 2, 5),
                 settings: ProbeSettings = ProbeSettings()) -> list[dict]:
    """SAEBench sparse probing: for each k, the top-k latents on train (`top_k_latents`), an L2 logistic regression
    (standardised inputs, C = settings.C) fitted on train; rows k, latents, train and test accuracy."""
    from sklearn.metrics import accuracy_score

    Z_train, y_train = _check_xy(Z_train, y_train, "sparse probe train", "classify")
    Z_test = matrix(Z_test, "sparse probe test latents")
    y_test = np.asarray(y_test)
    out = []
    for k in ks:
        idx = top_k_latents(Z_train, y_train, k)
        with one_blas_thread():
            est = make_estimator("logistic", "classify", settings).fit(Z_train[:, idx], y_train)
        out.append({"k": int(k), "latents": idx.tolist(),
                    "train": float(accuracy_score(y_train, est.predict(Z_train[:, idx]))),
                    "test": float(accuracy_score(y_test, est.predict(Z_test[:, idx])))})
    return out


def reconstruction_bias(X, X_hat) -> float:
    """Relative reconstruction bias E||x_hat||^2 / E<x, x_hat> (SAEBench; Wright & Sharkey): 1 for an unbiased
    reconstruction, c for x_hat = c x, below 1 when the SAE shrinks its reconstructions."""
    X, X_hat = matrix(X, "inputs"), matrix(X_hat, "reconstructions")
    if X.shape != X_hat.shape:
        raise MechdiffError(f"inputs {X.shape} and reconstructions {X_hat.shape} differ in shape")
    den = float(np.einsum("ij,ij->", X, X_hat))
    if not den > 0:
        raise MechdiffError(f"E<x, x_hat> = {den:.3g} is not positive: the reconstructions do not point along the inputs")
    return float(np.einsum("ij,ij->", X_hat, X_hat)) / den


def sae_reconstruction_bias(sae, X: np.ndarray, *, chunk: int = 4096) -> float:
    """`reconstruction_bias` of an SAE on raw inputs X (n, d_total), reconstructed in chunks."""
    import torch

    X = matrix(X, "SAE inputs")
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, len(X), chunk):
            x = torch.as_tensor(X[s : s + chunk], dtype=torch.float32)
            xh = sae(x).double()
            num += float((xh * xh).sum())
            den += float((x.double() * xh).sum())
    if not den > 0:
        raise MechdiffError(f"E<x, x_hat> = {den:.3g} is not positive: the reconstructions do not point along the inputs")
    return num / den


def binary_sparse_tasks(prompts: Sequence, *, target: str = "cultural", control: str = "control"
                        ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Binary tasks for sparse probing (SAEBench probes binary tasks): target vs control, and each trait's
    high vs low grades, split at the middle of the grades the trait's prompts carry (0-3: high = 2, 3; low = 0, 1;
    a subsample that lost a trait's top or bottom grade moves the middle with it).
    Tuples (name, train rows, train labels, test rows, test labels)."""
    out = []

    def add(name: str, keep: Callable, label: Callable) -> None:
        tr, te = _rows(prompts, keep, "train"), _rows(prompts, keep, "test")
        y_tr = np.array([label(prompts[i]) for i in tr], dtype=np.int64)
        y_te = np.array([label(prompts[i]) for i in te], dtype=np.int64)
        if len(te) and len(np.unique(y_tr)) == 2:
            out.append((name, tr, y_tr, te, y_te))

    add(f"{target}_vs_{control}", lambda q: q.dataset in (target, control), lambda q: int(q.dataset == target))
    for trait in sorted({q.trait for q in prompts if q.trait and q.label >= 0}):
        grades = [q.label for q in prompts if q.trait == trait and q.label >= 0]
        mid = (min(grades) + max(grades)) / 2
        add(f"trait:{trait}", lambda q, t=trait: q.trait == t and q.label >= 0, lambda q, m=mid: int(q.label > m))
    return out
