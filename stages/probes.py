"""Stage probes: hidden -> concept, hidden -> feature and embedding -> feature probes at every stored layer for base
and tuned (grouped CV on train, held-out test), the estimators compared at the SAE layers, SAE sparse probing and
the relative reconstruction bias of every SAE."""

import time

import numpy as np

import mechdiff.pipeline as P
from mechdiff.analysis.probes import (
    ProbeSettings,
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
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.sites import Site
from mechdiff.params import load_params
from mechdiff.sae import load_sae
from mechdiff.sae.sources import prompt_feature_means, read_source, rows_of

MODELS = ("base", "tuned")
EMBED = "embedding"  # the site name of embedding -> feature rows (layer -1: before block 0)


def input_embeddings(store, which: str) -> np.ndarray:
    """Per-prompt mean input embedding of model `which` over its prompt tokens (position 0 left out)."""
    from mechdiff.model.load import load_saved

    model, _ = load_saved(P.model_dir(which))
    E = model.get_input_embeddings().weight.detach().float().numpy()
    del model
    return mean_token_embeddings(E, store.index("tok_id"), store.index("tok_prompt"), store.index("tok_pos"), store.n)


def plot_layers(rows: list[dict], png) -> None:
    """One panel per task: test (solid) and CV mean (dotted) of the curve estimator by layer, base and tuned on the
    same axes; embedding -> feature as horizontal dashed lines on the feature panel."""
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
            cur = sorted((r for r in mine if r["model"] == m and r["site"] != EMBED), key=lambda r: r["layer"])
            if cur:
                x = [r["layer"] for r in cur]
                ax.plot(x, [r["test"] for r in cur], "-o", ms=3, color=colours[m], label=f"{m} test")
                ax.plot(x, [r["cv_mean"] for r in cur], ":", color=colours[m], label=f"{m} CV")
            for r in mine:
                if r["model"] == m and r["site"] == EMBED:
                    ax.axhline(r["test"], ls="--", lw=1, color=colours[m], label=f"{m} embedding")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("R^2" if mine and mine[0]["kind"] == "regress" else "accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=6)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, format="png", metadata={"Software": None})


def main() -> None:
    p = load_params()
    pr, s = p.probes, p.sae
    t0 = time.time()
    settings = ProbeSettings(folds=pr.folds, C=pr.C, ridge_alpha=pr.ridge_alpha, n_trees=pr.n_trees, seed=p.seed,
                             n_jobs=pr.n_jobs)
    base, tuned = P.open_stores()
    stores = {"base": base, "tuned": tuned}
    prompts = P.kept_prompts()
    for which, st in stores.items():
        if st.n != len(prompts) or not np.array_equal(st.index("prompt_id"), [q.pid for q in prompts]):
            raise MechdiffError(f"the {which} store's rows are not the kept prompts: re-run extract")
    sites = sorted((x for x in base.sites if x.endswith(".resid_post")), key=lambda x: Site.parse(x).layer)
    if not sites or sites != sorted((x for x in tuned.sites if x.endswith(".resid_post")),
                                    key=lambda x: Site.parse(x).layer):
        raise MechdiffError("base and tuned stores hold different resid_post sites (or none): re-run extract")
    sae_sites = [f"L{layer}.resid_post" for layer in s.layers]
    compare = [x for x in sae_sites if x in sites]
    all_rows = np.arange(len(prompts))
    used = np.array([i for i, q in enumerate(prompts) if q.split in ("train", "test")], dtype=np.int64)  # val unused

    # per-prompt SAE features (mean over each prompt's tokens, position 0 left out) of every SAE source
    feats: dict[tuple[str, int], np.ndarray] = {}
    saes = {}
    for layer in s.layers:
        for src in s.sources:
            saes[src, layer] = load_sae(P.sae_dir(src, layer))
            Z = prompt_feature_means(saes[src, layer], src, base, tuned, f"L{layer}.resid_post", s.view, used)
            feats[src, layer] = np.zeros((len(prompts), Z.shape[1]), dtype=np.float32)  # val rows stay 0, unread
            feats[src, layer][used] = Z
    print(f"probes: SAE features of {len(feats)} SAEs ({time.time() - t0:.0f}s)")

    tasks, skipped = concept_tasks(prompts, target=pr.target, control=pr.control, models=MODELS, folds=pr.folds)
    for name, why in skipped.items():
        print(f"probes: warning: task {name!r} skipped: {why}")
    feat_layer = s.layers[0]
    ftasks = []
    if all((m, feat_layer) in feats for m in MODELS):  # each model's own SAE features
        ft = feature_task(prompts, {m: feats[m, feat_layer] for m in MODELS}, n_features=pr.n_features,
                          name=f"sae_L{feat_layer}_features")
        ftasks.append(ft)
    else:
        print("probes: warning: feature probes need the base and tuned SAEs (sae.sources): skipped")
    kinds = {t.name: t.kind for t in tasks + ftasks}

    # hidden -> concept at every layer (view), hidden -> feature at every layer (feature_view)
    cache: dict = {}

    def reader(view: str):
        def read(m: str, site: str) -> np.ndarray:
            key = (m, site, view)
            if key not in cache:
                cache.clear()
                cache[key] = stores[m].read(site, view)
            return cache[key]
        return read

    rows = probe_by_layer(tasks, sites, reader(pr.view), models=MODELS, compare_sites=compare,
                          estimators=pr.estimators, settings=settings, layer_of=lambda x: Site.parse(x).layer,
                          progress=True)
    print(f"probes: hidden -> concept: {len(tasks)} tasks x {len(sites)} layers x 2 models ({time.time() - t0:.0f}s)")
    if ftasks:
        rows += probe_by_layer(ftasks, sites, reader(pr.feature_view), models=MODELS, compare_sites=compare,
                               estimators=pr.estimators, settings=settings, layer_of=lambda x: Site.parse(x).layer,
                               progress=True)
        print(f"probes: hidden -> feature: {len(sites)} layers x 2 models ({time.time() - t0:.0f}s)")
        if pr.embedding:
            emb = {m: input_embeddings(stores[m], m) for m in MODELS}
            et = feature_task(prompts, {m: feats[m, feat_layer] for m in MODELS}, n_features=pr.n_features,
                              strategy="embedding->feature", name=ftasks[0].name)
            erows = probe_by_layer([et], [EMBED], lambda m, _: emb[m], models=MODELS, settings=settings,
                                   layer_of=lambda _: -1)
            rows += erows
            print("probes: embedding -> feature: " + ", ".join(f"{r['model']} R^2 {r['test']:.3f}" for r in erows))
    for r in rows:
        r["kind"] = kinds[r["task"]]

    # shuffled-label controls at the first compare site (selectivity: should be ~chance / R^2 <= 0)
    metrics: dict = {"view": pr.view, "feature_view": pr.feature_view, "sites": sites, "compare_sites": compare,
                     "skipped": skipped}
    hidden_rows = [r for r in rows if r["site"] != EMBED]
    summary = summarise(hidden_rows, tasks + ftasks, models=MODELS, compare_sites=compare)
    if compare:
        for t in tasks + ftasks:
            view = pr.view if t.strategy == "hidden->concept" else pr.feature_view
            summary[t.name]["shuffled_test"] = {m: shuffled_control(t, stores[m].read(compare[0], view), m,
                                                                    settings=settings) for m in MODELS}
    for t in ftasks:
        summary[t.name]["features"] = t.info["features"]
        emb_rows = [r for r in rows if r["site"] == EMBED and r["task"] == t.name]
        if emb_rows:
            summary[t.name]["embedding_test"] = {r["model"]: r["test"] for r in emb_rows}
    metrics["tasks"] = summary
    for name, d in summary.items():
        b, tu = d.get("base", {}), d.get("tuned", {})
        print(f"probes: {name}: {d['metric']} base {b.get('test', float('nan')):.3f} @L{b.get('best_layer')}, "
              f"tuned {tu.get('test', float('nan')):.3f} @L{tu.get('best_layer')}, "
              f"tuned - base {d.get('diff_best_test', float('nan')):+.3f}; largest gap "
              f"{d.get('max_abs_diff', {}).get('diff', float('nan')):+.3f} @L{d.get('max_abs_diff', {}).get('layer')}")

    # SAE quality: sparse probing (SAEBench) and relative reconstruction bias on the test prompts' token rows
    sparse_rows, sparse, bias = [], {}, {}
    btasks = binary_sparse_tasks(prompts, target=pr.target, control=pr.control)
    test_rows = np.array([i for i, q in enumerate(prompts) if q.split == "test"], dtype=np.int64)
    for (src, layer), Z in feats.items():
        site = f"L{layer}.resid_post"
        key = f"{src}_L{layer}"
        dense = read_source(src, base, tuned, site, "mean", all_rows)
        for name, tr, ytr, te, yte in btasks:
            res = sparse_probe(Z[tr], ytr, Z[te], yte, ks=pr.sparse_k, settings=settings)
            dense_res = sparse_probe(dense[tr], ytr, dense[te], yte, ks=[dense.shape[1]], settings=settings)[0]
            for r in res:
                sparse_rows.append({"sae": key, "source": src, "layer": layer, "task": name, "k": r["k"],
                                    "train": r["train"], "test": r["test"],
                                    "latents": " ".join(map(str, r["latents"]))})
            sparse_rows.append({"sae": key, "source": src, "layer": layer, "task": name, "k": "dense",
                                "train": dense_res["train"], "test": dense_res["test"], "latents": ""})
            sparse.setdefault(key, {})[name] = {**{str(r["k"]): r["test"] for r in res},
                                                "dense": dense_res["test"]}
        X = read_source(src, base, tuned, site, s.view, rows_of(src, base, tuned, s.view, test_rows))
        bias[key] = sae_reconstruction_bias(saes[src, layer], X)
        mean_k = {k: float(np.mean([v[str(k)] for v in sparse[key].values()])) for k in pr.sparse_k}
        print(f"probes: SAE {key}: sparse probing mean test accuracy "
              + ", ".join(f"k={k} {v:.3f}" for k, v in mean_k.items())
              + f"; relative reconstruction bias {bias[key]:.3f}")
    metrics["sparse_probing"] = sparse
    metrics["reconstruction_bias"] = bias
    metrics["seconds"] = time.time() - t0

    cols = ("task", "strategy", "model", "layer", "estimator", "cv_mean", "cv_sd", "test", "train", "spearman", "site",
            "n_train", "n_test")
    write_csv(P.plot("probes_layers.csv"), [{c: r[c] for c in cols} for r in rows])
    write_csv(P.plot("probes_sparse.csv"), sparse_rows)
    plot_layers(rows, P.plot("probes_layers.png"))
    write_json(P.metric("probes.json"), metrics)
    print(f"probes: done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    run_stage(main)
