"""Stage features: feature statistics, Type A/B/C, cultural enrichment, themes, graded concepts, top examples."""

import mechdiff.pipeline as P
from mechdiff.analysis.features import FeatureSettings, analyse_features
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.load import load_tokenizer
from mechdiff.params import load_params
from mechdiff.sae import load_sae


def main() -> None:
    p = load_params()
    s, f = p.sae, p.features
    base, tuned = P.open_stores()
    tok = load_tokenizer(P.model_dir("tuned"))  # top examples are the tuned SAE's, on the tuned model's tokens
    settings = FeatureSettings(active_freq=f.active_freq, d_min=f.cohens_d, match_cos=f.match_cos, n_perm=f.n_perm,
                               fdr=f.fdr, n_top_cultural=f.n_top_cultural, top_examples=f.top_examples,
                               max_themes=f.max_themes, embeddings=tuple(f.embeddings), theme_seeds=f.theme_seeds,
                               theme_boot=f.theme_boot, stable_ari=f.stable_ari, theme_points=f.theme_points,
                               graded_top=f.graded_top, seed=p.seed)
    units = P.stage_units("features")  # an interrupted run resumes the finished means, embeddings and themes
    res = analyse_features(
        s.layers, lambda layer: {src: load_sae(P.sae_dir(src, layer)) for src in s.sources if src != "crosscoder"},
        base, tuned, P.kept_prompts(), lambda i: tok.decode([i]), view=s.view, settings=settings, units=units)
    write_csv(P.plot("enrichment.csv"), res.enrichment_rows)
    write_csv(P.plot("graded.csv"), res.graded_rows)
    write_csv(P.plot("feature_table.csv"), res.feature_rows)
    write_csv(P.plot("graded_top.csv"), res.graded_top_rows)
    P.plot("top_examples.md").write_text(res.examples_markdown())
    P.plot("themes.md").write_text(res.themes_markdown())
    write_json(P.metric("features.json"), res.metrics_json())
    write_json(P.metric("enrichment.json"), res.enrichment)
    units.done()
    for trait, why in res.skipped_traits.items():
        print(f"features: warning: trait {trait!r} skipped in the graded ranking: {why}")
    print(f"features: {len(res.enrichment_rows)} themes, {len(res.graded_rows)} graded rankings")


if __name__ == "__main__":
    run_stage(main)
