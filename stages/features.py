"""Stage features: feature statistics, Type A/B/C, cultural enrichment, themes, graded concepts, top examples."""

import numpy as np

import mechdiff.pipeline as P
from mechdiff.analysis.features import (
    NO_THEME,
    activation_stats,
    classify_types,
    examples_markdown,
    graded_scores,
    permutation_enrichment,
    text_themes,
    text_themes_markdown,
    theme_enrichment,
    themes,
    top_examples,
)
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.load import load_tokenizer
from mechdiff.params import load_params
from mechdiff.pipeline import kept_prompts
from mechdiff.sae import load_sae
from mechdiff.sae.sources import encode_rows, prompt_feature_means, source_rows

MAX_ROWS = 16384  # token rows sampled for the base-vs-tuned statistics
TOP_TEXTS = 10  # a feature's text theme is read from its TOP_TEXTS most activating cultural / control prompts
ENRICH_KEYS = ("enrichment", "p", "q", "n_group", "n_group_selected")


def main() -> None:
    p = load_params()
    s, f = p.sae, p.features
    base, tuned = P.open_stores()
    prompts = kept_prompts()
    rng = np.random.default_rng(p.seed)
    datasets = np.array([q.dataset for q in prompts])
    tok = load_tokenizer(P.model_dir("base"))
    metrics: dict = {}
    enrich: dict = {}
    enrich_rows, graded_rows, md = [], [], ["# Top-activating examples", ""]
    themes_md = ["# Feature themes by top-activating texts", "",
                 "Pooled base / tuned / delta SAE features, each represented by the TF-IDF of its most activating",
                 "prompts, clustered with k-means (k by silhouette); E_c = share of delta-SAE features in the theme",
                 "over their share among all features with a theme (README: How to read the metrics).", ""]
    for layer in s.layers:
        site = f"L{layer}.resid_post"
        saes = {src: load_sae(P.sae_dir(src, layer)) for src in s.sources if src != "crosscoder"}
        all_rows = source_rows(base, s.view, np.arange(len(prompts)))
        sample = np.sort(rng.choice(all_rows, size=min(MAX_ROWS, len(all_rows)), replace=False))
        Xb, Xt = base.read(site, s.view, sample), tuned.read(site, s.view, sample)
        for src in ("base", "tuned"):
            if src not in saes:
                continue
            st = activation_stats(encode_rows(saes[src], Xb), encode_rows(saes[src], Xt))
            _, counts = classify_types(st, active_freq=f.active_freq, d_min=f.cohens_d)
            metrics[f"{src}_L{layer}"] = {f"type_{t}": n for t, n in counts.items()}
        # cultural vs control, per prompt
        cc = np.flatnonzero(np.isin(datasets, ["cultural", "control"]))
        means = {}
        for src, sae in saes.items():
            A = prompt_feature_means(sae, src, base, tuned, site, s.view, cc)
            means[src] = A
            res = permutation_enrichment(A, datasets[cc] == "cultural", n_perm=f.n_perm, seed=p.seed, alpha=f.fdr)
            metrics.setdefault(f"{src}_L{layer}", {})["n_cultural_features"] = res["n_significant"]
            if src == "tuned":
                top_cultural = np.argsort(-res["diff"])[:3]
        # themes over the pooled decoder directions; enrichment of delta-SAE features per theme
        if "delta" in saes and len(saes) > 1:
            names = list(saes)
            dirs = np.concatenate([saes[n].W_dec.detach().numpy().T for n in names])
            origin = np.concatenate([[n] * saes[n].width for n in names])
            th = themes(dirs, k_range=range(2, f.max_themes + 1), seed=p.seed)
            rows = theme_enrichment(th["labels"], origin == "delta", alpha=f.fdr)
            for r in rows:
                enrich_rows.append({"layer": layer, "by": "decoder", **r})
                enrich[f"L{layer}.theme{r['theme']}"] = {k: r[k] for k in ENRICH_KEYS}
            enrich[f"L{layer}.k"] = th["k"]
            # the same features clustered by their top-activating cultural / control prompts
            A_all = np.concatenate([means[n] for n in names], axis=1)
            tt = text_themes(A_all, [prompts[i].text for i in cc], top_n=TOP_TEXTS,
                             k_range=range(2, f.max_themes + 1), seed=p.seed)
            rows = theme_enrichment(tt["labels"], origin == "delta", alpha=f.fdr, ignore_label=NO_THEME)
            for r in rows:
                words = " ".join(tt["top_words"][r["theme"]])
                enrich_rows.append({"layer": layer, "by": "text", **r, "top_words": words})
                enrich[f"L{layer}.text_theme{r['theme']}"] = {k: r[k] for k in ENRICH_KEYS}
            enrich[f"L{layer}.text_k"] = tt["k"]
            enrich[f"L{layer}.text_n_no_theme"] = int((tt["labels"] == NO_THEME).sum())
            themes_md.append(text_themes_markdown(tt, rows, title=f"L{layer}"))
        # graded concepts on the trait corpus
        tr = np.flatnonzero(datasets == "trait")
        if len(tr):
            traits = np.array([prompts[i].trait for i in tr])
            labels = np.array([prompts[i].label for i in tr])
            for src in ("base", "tuned"):
                if src not in saes:
                    continue
                A = prompt_feature_means(saes[src], src, base, tuned, site, s.view, tr)
                for trait in sorted(set(traits)):
                    m = traits == trait
                    g = graded_scores(A[m], labels[m])
                    best = int(np.argmax(g["score"]))
                    graded_rows.append({"layer": layer, "source": src, "trait": trait, "best_feature": best,
                                        "score": g["score"][best], "r": g["r"][best], "tpr": g["tpr"][best],
                                        "fpr": g["fpr"][best], "n_keep": int(g["keep"].sum())})
                    metrics.setdefault(f"{src}_L{layer}", {})[f"graded_{trait}_best_score"] = float(g["score"][best])
                    metrics[f"{src}_L{layer}"][f"graded_{trait}_n_keep"] = int(g["keep"].sum())
        # top-activating examples of the tuned SAE's most cultural features
        if s.view == "tokens" and "tuned" in saes:
            trows = source_rows(base, "tokens", np.arange(len(prompts)))
            Z = encode_rows(saes["tuned"], tuned.read(site, "tokens", trows), features=top_cultural)
            toks = [tok.decode([int(i)]) for i in base.index("tok_id")[trows]]
            pids = base.index("tok_prompt")[trows]
            for j, feat in enumerate(top_cultural):
                recs = top_examples(Z[:, j], toks, pids, k=f.top_examples)
                md.append(examples_markdown(recs, title=f"L{layer} tuned SAE feature {int(feat)} (most cultural)"))
    write_csv(P.plot("enrichment.csv"), enrich_rows)
    write_csv(P.plot("graded.csv"), graded_rows)
    with open(P.plot("top_examples.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    if not enrich_rows:
        themes_md.append("No themes: the features stage needs the delta SAE and at least one other source.")
    with open(P.plot("themes.md"), "w") as fh:
        fh.write("\n".join(themes_md) + "\n")
    write_json(P.metric("features.json"), metrics)
    write_json(P.metric("enrichment.json"), enrich)
    print(f"features: {len(enrich_rows)} themes, {len(graded_rows)} graded rankings")


if __name__ == "__main__":
    run_stage(main)
