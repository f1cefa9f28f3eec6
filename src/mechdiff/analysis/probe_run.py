"""The probes stage's run over loaded objects: per-prompt SAE features of every SAE, the concept and feature tasks,
hidden -> concept / hidden -> feature probes at every layer for base and tuned, embedding -> feature probes,
shuffled-label controls and the headline summary, then SAE sparse probing and the relative reconstruction bias of
every SAE; the layer-curve figure.

Everything takes already-loaded objects (the two activation stores, the kept prompts in store row order, the SAEs
{(source, layer): sae}, a callable giving a model's input-embedding matrix) and returns rows and metrics dicts; the
science is in `mechdiff.analysis.probes`. The library never reads params nor names output paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mechdiff.analysis.probes import (
    ESTIMATORS,
    ProbeSettings,
    Task,
    binary_sparse_tasks,
    concept_tasks,
    curve_estimator,
    feature_task,
    mean_token_embeddings,
    probe_by_layer,
    sae_reconstruction_bias,
    shuffled_control,
    sparse_probe,
    summarise,
)
from mechdiff.data.store import ActStore
from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site
from mechdiff.resume import UnitsFn, compute_all
from mechdiff.sae.sources import first_position, prompt_feature_means, read_source, rows_of

MODELS = ("base", "tuned")
EMBED = "embedding"  # the site name of embedding -> feature rows (layer -1: before block 0)
CONCAT_LAYER = -2  # the layer of hidden -> concept rows on concatenated layers (site "L<a>+L<b>+...")
LAYER_COLUMNS = ("task", "strategy", "model", "layer", "estimator", "cv_mean", "cv_sd", "test", "train", "spearman",
                 "site", "n_train", "n_test")


@dataclass(frozen=True)
class ProbeRunSettings:
    """What the probes run does: the SAE layers (the first gives the feature targets; their sites are where the
    estimators are compared) and the SAEs' input view, the store views of the concept and feature probes, the
    target / control datasets, the compared estimators, the number of feature targets, whether to probe from input
    embeddings, sparse probing's k values and how each probe is fitted."""

    sae_layers: tuple[int, ...]
    sae_view: str = "tokens"
    view: str = "last"
    feature_view: str = "mean"
    target: str = "cultural"
    control: str = "control"
    estimators: tuple[str, ...] = ESTIMATORS
    n_features: int = 8
    embedding: bool = True
    sparse_k: tuple[int, ...] = (1, 2, 5)
    concat_layers: tuple[int, ...] | str = ()  # hidden -> concept also on these layers' resid_post side by side
    # (seed 001); "auto": `auto_concat_layers` of the stored layers
    probe: ProbeSettings = field(default_factory=ProbeSettings)


@dataclass
class ProbeRun:
    """The run's outputs: layer rows (every probe, with its task's kind), sparse-probing rows, the metrics dict."""

    rows: list[dict]
    sparse_rows: list[dict]
    metrics: dict


def _layer(site: str) -> int:
    return Site.parse(site).layer


def check_store_rows(stores: Mapping[str, ActStore], prompts: Sequence) -> None:
    """Raise unless every store's rows are the prompts, in order."""
    for which, st in stores.items():
        if st.n != len(prompts) or not np.array_equal(st.index("prompt_id"), [q.pid for q in prompts]):
            raise MechdiffError(f"the {which} store's rows are not the kept prompts: re-run extract")


def resid_sites(base: ActStore, tuned: ActStore) -> list[str]:
    """The resid_post sites of both stores by layer; raise when the stores differ or hold none."""
    sites = sorted((x for x in base.sites if x.endswith(".resid_post")), key=_layer)
    if not sites or sites != sorted((x for x in tuned.sites if x.endswith(".resid_post")), key=_layer):
        raise MechdiffError("base and tuned stores hold different resid_post sites (or none): re-run extract")
    return sites


def sae_prompt_features(saes: Mapping[tuple[str, int], object], base: ActStore, tuned: ActStore, n_prompts: int,
                        rows: np.ndarray, view: str) -> dict[tuple[str, int], np.ndarray]:
    """Per-prompt SAE features (mean over each prompt's `source_rows` tokens, for the tokens view) of every
    SAE {(source, layer): sae}, (n_prompts, width) each; only `rows` are filled, the other rows stay 0."""
    feats: dict[tuple[str, int], np.ndarray] = {}
    for (src, layer), sae in saes.items():
        Z = prompt_feature_means(sae, src, base, tuned, f"L{layer}.resid_post", view, rows)
        feats[src, layer] = np.zeros((n_prompts, Z.shape[1]), dtype=np.float32)
        feats[src, layer][rows] = Z
    return feats


class CachedReader:
    """`read(model, site)` of one view from the stores, keeping only the last array read (the probes visit each
    (model, site) once; the cache is shared by every view's reader)."""

    def __init__(self, stores: Mapping[str, ActStore]) -> None:
        self.stores = stores
        self.cache: dict = {}

    def view(self, view: str) -> Callable[[str, str], np.ndarray]:
        def read(m: str, site: str) -> np.ndarray:
            key = (m, site, view)
            if key not in self.cache:
                self.cache.clear()
                self.cache[key] = self.stores[m].read(site, view)
            return self.cache[key]
        return read


def sae_quality(feats: Mapping[tuple[str, int], np.ndarray], saes: Mapping[tuple[str, int], object], base: ActStore,
                tuned: ActStore, prompts: Sequence, st: ProbeRunSettings, *,
                progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict, dict]:
    """SAEBench sparse probing of every SAE's per-prompt features on the binary tasks (with a dense probe on the
    SAE's mean-view inputs for reference) and each SAE's relative reconstruction bias on the test prompts' rows of
    `st.sae_view`. Returns (sparse rows, {sae: {task: {k: test accuracy, 'dense': ...}}}, {sae: bias})."""
    sparse_rows: list[dict] = []
    sparse: dict = {}
    bias: dict = {}
    btasks = binary_sparse_tasks(prompts, target=st.target, control=st.control)
    all_rows = np.arange(len(prompts))
    test_rows = np.array([i for i, q in enumerate(prompts) if q.split == "test"], dtype=np.int64)
    for (src, layer), Z in feats.items():
        site = f"L{layer}.resid_post"
        key = f"{src}_L{layer}"
        dense = read_source(src, base, tuned, site, "mean", all_rows)
        for name, tr, ytr, te, yte in btasks:
            res = sparse_probe(Z[tr], ytr, Z[te], yte, ks=st.sparse_k, settings=st.probe)
            dense_res = sparse_probe(dense[tr], ytr, dense[te], yte, ks=[dense.shape[1]], settings=st.probe)[0]
            for r in res:
                sparse_rows.append({"sae": key, "source": src, "layer": layer, "task": name, "k": r["k"],
                                    "train": r["train"], "test": r["test"],
                                    "latents": " ".join(map(str, r["latents"]))})
            sparse_rows.append({"sae": key, "source": src, "layer": layer, "task": name, "k": "dense",
                                "train": dense_res["train"], "test": dense_res["test"], "latents": ""})
            sparse.setdefault(key, {})[name] = {**{str(r["k"]): r["test"] for r in res},
                                                "dense": dense_res["test"]}
        X = read_source(src, base, tuned, site, st.sae_view, rows_of(src, base, tuned, st.sae_view, test_rows))
        bias[key] = sae_reconstruction_bias(saes[src, layer], X)
        if progress:
            mean_k = {k: float(np.mean([v[str(k)] for v in sparse[key].values()])) for k in st.sparse_k}
            progress(f"probes: SAE {key}: sparse probing mean test accuracy "
                     + ", ".join(f"k={k} {v:.3f}" for k, v in mean_k.items())
                     + f"; relative reconstruction bias {bias[key]:.3f}")
    return sparse_rows, sparse, bias


def auto_concat_layers(sites: Sequence[str]) -> tuple[int, ...]:
    """The stored resid_post layers up to a third of the depth (the deepest stored layer + 1), at least the first
    two; () when fewer than two are stored."""
    layers = sorted({_layer(x) for x in sites if x.endswith(".resid_post")})
    if len(layers) < 2:
        return ()
    first = [x for x in layers if x <= (layers[-1] + 1) // 3]
    return tuple(first if len(first) >= 2 else layers[:2])


def concat_site(layers: Sequence[int], sites: Sequence[str]) -> str | None:
    """The site name of `layers`' resid_post side by side ("L0+L2+L4"), None for no layers; raise when a layer is
    not stored or fewer than two are given."""
    if not layers:
        return None
    missing = [x for x in layers if f"L{x}.resid_post" not in sites]
    if missing or len(set(layers)) < 2 or len(set(layers)) < len(layers):
        raise MechdiffError(f"probes.concat_layers {list(layers)}: give two or more stored layers, each once "
                            f"({'not stored: ' + ', '.join(map(str, missing)) + '; ' if missing else ''}stored: "
                            f"{', '.join(str(_layer(x)) for x in sites)})")
    return "+".join(f"L{x}" for x in layers)


def concat_reader(stores: Mapping[str, ActStore], layers: Sequence[int], view: str
                  ) -> Callable[[str, str], np.ndarray]:
    """`read(model, _)`: that model's `view` of every layer in `layers` (resid_post), side by side (n, len x d)."""
    def read(m: str, _site: str) -> np.ndarray:
        return np.hstack([stores[m].read(f"L{x}.resid_post", view) for x in layers])
    return read


def _summary_line(name: str, d: dict) -> str:
    b, tu = d.get("base", {}), d.get("tuned", {})
    c = d.get("concat")
    side = "" if not c else (f"; layers {'+'.join(map(str, c['layers']))} side by side: base "
                             f"{c.get('base', float('nan')):.3f}, tuned {c.get('tuned', float('nan')):.3f}")
    return (f"probes: {name}: {d['metric']} base {b.get('test', float('nan')):.3f} @L{b.get('best_layer')}, "
            f"tuned {tu.get('test', float('nan')):.3f} @L{tu.get('best_layer')}, "
            f"tuned - base {d.get('diff_best_test', float('nan')):+.3f}; largest gap "
            f"{d.get('max_abs_diff', {}).get('diff', float('nan')):+.3f} @L{d.get('max_abs_diff', {}).get('layer')}"
            + side)


def run_probes(base: ActStore, tuned: ActStore, prompts: Sequence, saes: Mapping[tuple[str, int], object],
               embeddings: Callable[[str], np.ndarray], st: ProbeRunSettings, *,
               progress: Callable[[str], None] | None = None, t0: float | None = None,
               units: UnitsFn = compute_all) -> ProbeRun:
    """The whole probes run. `prompts` are the stores' rows in order; `saes` maps (source, layer) to a loaded SAE
    (visited in that order; the base and tuned SAEs of the first of `st.sae_layers` give the feature targets);
    `embeddings(model)` is that model's input-embedding matrix (vocab, d), called only for embedding -> feature.
    `progress` receives one line per step, with the seconds since `t0` (default: the call). `units`
    (`resume.Units`) keeps each finished step (each family of probes, the controls, the SAE quality), so an
    interrupted run resumes."""
    t0 = time.time() if t0 is None else t0
    say = progress or (lambda _: None)
    stores = {"base": base, "tuned": tuned}
    check_store_rows(stores, prompts)
    sites = resid_sites(base, tuned)
    concat_layers = auto_concat_layers(sites) if st.concat_layers == "auto" else tuple(st.concat_layers)
    concat = concat_site(concat_layers, sites)  # before any fit: a layer that is not stored fails at once
    compare = [x for x in (f"L{layer}.resid_post" for layer in st.sae_layers) if x in sites]
    used = np.array([i for i, q in enumerate(prompts) if q.split in ("train", "test")], dtype=np.int64)  # val unused
    s = st.probe

    feats = sae_prompt_features(saes, base, tuned, len(prompts), used, st.sae_view)
    say(f"probes: SAE features of {len(feats)} SAEs ({time.time() - t0:.0f}s)")

    tasks, skipped = concept_tasks(prompts, target=st.target, control=st.control, models=MODELS, folds=s.folds)
    for name, why in skipped.items():
        say(f"probes: warning: task {name!r} skipped: {why}")
    feat_layer = st.sae_layers[0] if st.sae_layers else None
    ftasks: list[Task] = []
    if feat_layer is not None and all((m, feat_layer) in feats for m in MODELS):  # each model's own SAE features
        ftasks.append(feature_task(prompts, {m: feats[m, feat_layer] for m in MODELS}, n_features=st.n_features,
                                   name=f"sae_L{feat_layer}_features"))
    else:
        say("probes: warning: feature probes need the base and tuned SAEs (sae.sources): skipped")
    kinds = {t.name: t.kind for t in tasks + ftasks}

    # hidden -> concept at every layer (view), hidden -> feature at every layer (feature_view)
    reader = CachedReader(stores)
    kw = {"models": MODELS, "compare_sites": compare, "estimators": st.estimators, "settings": s, "layer_of": _layer,
          "progress": progress is not None}
    rows = units("concept", lambda: probe_by_layer(tasks, sites, reader.view(st.view), **kw))
    say(f"probes: hidden -> concept: {len(tasks)} tasks x {len(sites)} layers x 2 models ({time.time() - t0:.0f}s)")
    if concat:
        rows += units("concat", lambda: probe_by_layer(
            tasks, [concat], concat_reader(stores, concat_layers, st.view), models=MODELS, settings=s,
            layer_of=lambda _: CONCAT_LAYER, progress=progress is not None))
        say(f"probes: hidden -> concept on {concat} side by side ({time.time() - t0:.0f}s)")
    if ftasks:
        rows += units("feature", lambda: probe_by_layer(ftasks, sites, reader.view(st.feature_view), **kw))
        say(f"probes: hidden -> feature: {len(sites)} layers x 2 models ({time.time() - t0:.0f}s)")
        if st.embedding:
            def embedding_rows() -> list[dict]:
                emb = {m: mean_token_embeddings(embeddings(m), stores[m].index("tok_id"),
                                                stores[m].index("tok_prompt"), stores[m].index("tok_pos"),
                                                stores[m].n, first=first_position(stores[m])) for m in MODELS}
                et = feature_task(prompts, {m: feats[m, feat_layer] for m in MODELS}, n_features=st.n_features,
                                  strategy="embedding->feature", name=ftasks[0].name)
                return probe_by_layer([et], [EMBED], lambda m, _: emb[m], models=MODELS, settings=s,
                                      layer_of=lambda _: -1)

            erows = units("embedding", embedding_rows)
            rows += erows
            say("probes: embedding -> feature: " + ", ".join(f"{r['model']} R^2 {r['test']:.3f}" for r in erows))
    for r in rows:
        r["kind"] = kinds[r["task"]]

    # shuffled-label controls at the first compare site (selectivity: should be ~chance / R^2 <= 0)
    metrics: dict = {"view": st.view, "feature_view": st.feature_view, "sites": sites, "compare_sites": compare,
                     "skipped": skipped}
    hidden_rows = [r for r in rows if r["layer"] >= 0]  # one layer each: not the embedding or concatenated rows
    summary = summarise(hidden_rows, tasks + ftasks, models=MODELS, compare_sites=compare)
    if compare:
        def shuffled() -> dict[str, dict]:
            out = {}
            for t in tasks + ftasks:
                view = st.view if t.strategy == "hidden->concept" else st.feature_view
                out[t.name] = {m: shuffled_control(t, stores[m].read(compare[0], view), m, settings=s)
                               for m in MODELS}
            return out

        for name, got in units("shuffled", shuffled).items():
            summary[name]["shuffled_test"] = got
    for t in ftasks:
        summary[t.name]["features"] = t.info["features"]
        emb_rows = [r for r in rows if r["site"] == EMBED and r["task"] == t.name]
        if emb_rows:
            summary[t.name]["embedding_test"] = {r["model"]: r["test"] for r in emb_rows}
    if concat:  # the concatenated layers' test score beside each model's best single layer
        for t in tasks:
            got = {r["model"]: r["test"] for r in rows if r["site"] == concat and r["task"] == t.name}
            summary[t.name]["concat"] = {"layers": list(concat_layers), **got}
    metrics["tasks"] = summary
    metrics["concat_site"] = concat
    for name, d in summary.items():
        say(_summary_line(name, d))

    # SAE quality: sparse probing (SAEBench) and relative reconstruction bias on the test prompts' token rows
    sparse_rows, sparse, bias = units("sae_quality",
                                      lambda: sae_quality(feats, saes, base, tuned, prompts, st, progress=progress))
    metrics["sparse_probing"] = sparse
    metrics["reconstruction_bias"] = bias
    return ProbeRun(rows=rows, sparse_rows=sparse_rows, metrics=metrics)


def layer_table(rows: Sequence[dict]) -> list[dict]:
    """The layer rows restricted to LAYER_COLUMNS, in that order (the probes_layers table)."""
    return [{c: r[c] for c in LAYER_COLUMNS} for r in rows]


def plot_layers(rows: Sequence[dict], png: Path) -> None:
    """One panel per task: test (solid) and CV mean (dotted) of the curve estimator by layer, base and tuned on the
    same axes; embedding -> feature as horizontal dashed lines on the feature panel, concatenated layers as
    dash-dotted ones on the concept panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    ncol = min(3, len(tasks))
    nrow = -(-len(tasks) // ncol)
    fig = Figure(figsize=(4.2 * ncol, 3.0 * nrow), dpi=100)
    FigureCanvasAgg(fig)
    colours = {"base": "tab:blue", "tuned": "tab:orange"}
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        mine = [r for r in rows if r["task"] == task and r["estimator"] == curve_estimator(r["kind"])]
        for m in MODELS:
            cur = sorted((r for r in mine if r["model"] == m and r["layer"] >= 0), key=lambda r: r["layer"])
            if cur:
                x = [r["layer"] for r in cur]
                ax.plot(x, [r["test"] for r in cur], "-o", ms=3, color=colours[m], label=f"{m} test")
                ax.plot(x, [r["cv_mean"] for r in cur], ":", color=colours[m], label=f"{m} CV")
            for r in mine:
                if r["model"] == m and r["site"] == EMBED:
                    ax.axhline(r["test"], ls="--", lw=1, color=colours[m], label=f"{m} embedding")
                elif r["model"] == m and r["layer"] == CONCAT_LAYER:
                    ax.axhline(r["test"], ls="-.", lw=1, color=colours[m], label=f"{m} {r['site']}")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("R^2" if mine and mine[0]["kind"] == "regress" else "accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=6)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, format="png", metadata={"Software": None})
