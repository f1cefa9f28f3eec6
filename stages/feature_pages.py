"""Stage feature_pages: one static HTML page per reported SAE feature, an index, and token-by-token activation plots.

Reported features, per layer of sae.layers (site L<layer>.resid_post, view tokens):
- top cultural: the tuned SAE's feature_pages.n_top features with the largest cultural - control difference of
  per-prompt mean activations (`cultural_features`, as the features stage ranks them);
- top graded: each row of plots/graded.csv (per source and trait, the best graded feature);
- gated: the first feature_pages.max_gated rows of plots/gates_features.csv, when that file exists (columns
  source, layer, feature; layer may be left out when sae.layers has one layer), its other columns shown as they are.
A feature reported for several reasons gets one page. Writes plots/feature_pages/{index.html,<name>.html} and
plots/feature_tokens/<name>.png, name = <source>_L<layer>_f<feature>. The science is
`mechdiff.report.feature_pages.build_feature_pages`.
"""

import functools
import shutil

import pandas as pd

import mechdiff.pipeline as P
from mechdiff.analysis.geometry import final_norm_weight, unembedding
from mechdiff.io import run_stage
from mechdiff.model.load import load_saved, load_tokenizer
from mechdiff.params import load_params
from mechdiff.report.feature_pages import (
    PAGE_SOURCES,
    FeaturePages,
    PageSettings,
    build_feature_pages,
    view_note,
)
from mechdiff.sae import load_sae


def read_table(path) -> pd.DataFrame:
    """A CSV as a DataFrame; empty when the file is absent or has no rows."""
    if not path.exists():
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


@functools.cache
def lens(which: str):
    """(unembedding, final norm weight) of the base or tuned model, loaded once."""
    model, _ = load_saved(P.model_dir(which))  # float32: the saved weights exactly, whatever pair.dtype
    return unembedding(model), final_norm_weight(model)


def main() -> None:
    p = load_params()
    s, fp = p.sae, p.feature_pages
    pages_dir, png_dir = P.plot("feature_pages"), P.plot("feature_tokens")
    note = view_note(s.view)
    if note:
        out = FeaturePages(note=note)
    else:
        prompts = P.kept_prompts()
        graded = read_table(P.plot("graded.csv"))
        gates = read_table(P.plot("gates_features.csv"))
        sources = [src for src in s.sources if src in PAGE_SOURCES]
        base, tuned = P.open_stores()
        saes = {(src, layer): load_sae(P.sae_dir(src, layer)) for layer in s.layers for src in sources}
        toks = {w: load_tokenizer(P.model_dir(w)) for w in ("base", "tuned")}
        dec = {w: functools.lru_cache(maxsize=None)(lambda i, t=toks[w]: t.decode([i])) for w in toks}
        units = P.stage_units("feature_pages")  # an interrupted run resumes each SAE's finished pages
        out = build_feature_pages(
            base=base, tuned=tuned, saes=saes, prompts=prompts, sources=sources, layers=s.layers, graded=graded,
            gates=gates, lens=lens, decoders=dec, gates_table=str(P.plot("gates_features.csv")),
            settings=PageSettings(n_top=fp.n_top, max_gated=fp.max_gated, n_contexts=fp.n_contexts,
                                  n_logit_tokens=fp.n_logit_tokens, hist_bins=fp.hist_bins,
                                  plot_prompts=fp.plot_prompts), units=units)
    # every input has been read and every page rendered: only now replace the previous outputs
    for d in (pages_dir, png_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for name, page in out.pages.items():
        (pages_dir / f"{name}.html").write_text(page, encoding="utf-8")
    for name, png in out.pngs.items():
        (png_dir / f"{name}.png").write_bytes(png)
    (pages_dir / "index.html").write_text(out.index(), encoding="utf-8")
    if not note:
        units.done()
    print(f"feature_pages: {len(out.pages)} feature pages in {pages_dir}, {len(out.pngs)} token plots in {png_dir}")


if __name__ == "__main__":
    run_stage(main)
