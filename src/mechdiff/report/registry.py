"""What each stage shows in the report: its figures, tables and summary facts, declared once.

The report renders exactly these entries, in this order. Every file a stage declares under metrics/ or plots/
in dvc.yaml has exactly one entry here, and vice versa (tests/report/test_registry.py checks it). A new stage
adds a `StageReport`; a new figure, table or summary line is one more entry in its tuple.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mechdiff.report import summary as S
from mechdiff.report.plots import KINDS
from mechdiff.report.run import Ref, Run, metric, plot

TABLE_KINDS = ("json", "csv", "markdown", "files", "images")


@dataclass(frozen=True)
class Figure:
    """A figure: the table `data` drawn as `kind` (x / y columns, one line per `group`), or the stage's own `image`."""

    key: str
    title: str
    data: Ref
    x: str
    y: tuple[str, ...]
    caption: str
    group: str | None = None
    kind: str = "line"
    logx: bool = False
    band: tuple[str, str] | None = None  # (lo, hi) columns of a confidence band the report draws
    image: Ref | None = None  # a PNG the stage draws from `data`; the report draws `data` itself when None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"figure {self.key}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def refs(self) -> tuple[Ref, ...]:
        """The declared files this figure shows."""
        return (self.data,) if self.image is None else (self.data, self.image)


@dataclass(frozen=True)
class Table:
    """A folded table: a metrics JSON, a CSV, a markdown file, a folder of files (listed as links) or of PNG images
    (shown)."""

    key: str
    title: str
    path: Ref
    kind: str
    caption: str
    columns: dict[str, str] = field(default_factory=dict)  # column -> how to read it (shown under the header)

    def __post_init__(self) -> None:
        if self.kind not in TABLE_KINDS:
            raise ValueError(f"table {self.key}: kind {self.kind!r} is not one of {TABLE_KINDS}")

    @property
    def refs(self) -> tuple[Ref, ...]:
        """The declared files this table shows."""
        return (self.path,)


@dataclass(frozen=True)
class SummaryItem:
    """A summary line: its heading, the function computing its facts, and the figure or table its numbers link to."""

    label: str
    facts: Callable[[Run], list[S.Fact]]
    anchor: str


@dataclass(frozen=True)
class StageReport:
    """Everything one DVC stage (matrix stages by their base name) contributes to the report."""

    stage: str
    title: str
    about: str
    figures: tuple[Figure, ...] = ()
    tables: tuple[Table, ...] = ()
    summary: tuple[SummaryItem, ...] = ()

    @property
    def refs(self) -> tuple[Ref, ...]:
        """Every declared file of the stage that the report shows."""
        return tuple(r for item in (*self.figures, *self.tables) for r in item.refs)


_SAE_COLUMNS = {
    "fvu": "unexplained variance share; lower is better, < 0.1 is good",
    "l0": "mean active latents per token",
    "dead_pct": "% of latents that never fired",
    "ce_recovered": "share of the CE gap (zero-ablation vs real) closed by the splice; 1 = perfect",
    "kl_recovered": "the same for next-token KL",
    "sparsity_ratio": "width / L0 (the seed's sparsity ratio)",
    "passed": "meets every sae.validate threshold (FVU, sparsity ratio, dead %, KL recovered)",
    "failed": "the sae.validate checks it misses",
}

STAGES: tuple[StageReport, ...] = (
    StageReport(
        "prepare", "Prompts", "The prompt corpus and its train / val / test splits.",
        tables=(Table("prepare", "Prompt counts", metric("prepare.json"), "json",
                      "Prompts kept per dataset and split."),),
    ),
    StageReport(
        "model_tuned", "Tuned model", "How the tuned model was made (a fine-tune of the base or a planted edit).",
        figures=(Figure("finetune-loss", "Fine-tune loss", plot("finetune_loss.csv"), "step", ("loss",),
                        "Training loss per step of the narrow fine-tune; empty when the tuned model is not a "
                        "fine-tune of the base (a given model or a planted edit)."),),
        tables=(Table("model-tuned", "Tuned model", metric("model_tuned.json"), "json",
                      "Recipe summary (planted edit layer / rank, or fine-tune loss) and wall time."),),
    ),
    StageReport(
        "fairness", "Token fairness", "The shared vocabulary the two models are compared on.",
        tables=(Table("fairness", "Fairness filter", metric("fairness.json"), "json",
                      "Whether the tokenizers are identical, the number of shared tokens and of prompts kept."),),
    ),
    StageReport(
        "divergence", "Divergence", "Where base and tuned representations and outputs differ.",
        figures=(
            Figure("cka", "CKA(base, tuned) by layer", plot("cka.csv"), "layer", ("cka_last", "cka_mean"),
                   "Linear CKA between base and tuned activations (resid_post) at the last token and averaged "
                   "over tokens: 1 = the same representation up to rotation and scale; the lower, the more "
                   "the layer changed.", image=plot("cka.png")),
            Figure("layer-patch", "Layer patch: KL by layer", plot("layer_patch.csv"), "layer",
                   ("kl_base_into_tuned", "kl_tuned_into_base"),
                   "Next-token KL after patching one model's resid_post at a layer into the other (validation "
                   "prompts): 0 before the layers the tuning changed, rising where the change is carried."),
            Figure("layer-patch-flip", "Layer patch: decisions that follow the patch", plot("layer_patch_flip.csv"),
                   "layer", ("flip_base_into_tuned", "flip_tuned_into_base"),
                   "Among the validation prompts where base and tuned pick different next tokens, the share whose "
                   "decision becomes the source model's after its resid_post at that layer is patched in: the "
                   "behaviour side of the layer patch (1 = the patch carries the whole decision)."),
            Figure("kl-by-dataset", "Next-token KL by dataset", plot("kl_by_dataset.csv"), "kl_mean", ("dataset",),
                   "KL(tuned || base) at the decision token, mean and bootstrap CI per dataset: a change specific "
                   "to the tuning domain shows as cultural well above control.", kind="barh",
                   band=("kl_lo", "kl_hi")),
        ),
        tables=(
            Table("divergence", "Divergence metrics", metric("divergence.json"), "json",
                  "CKA per site (last token / token mean), KL per dataset, layer-patch KL per layer "
                  "(rows L<n> are layers).",
                  {"last": "CKA at the last token", "mean": "CKA over all tokens"}),
            Table("cka-sites", "CKA at the detail sites", plot("cka_sites.csv"), "csv",
                  "CKA with bootstrap CI at the attention and MLP outputs of the detail layers.",
                  {"cka_last": "CKA at the last token", "cka_mean": "CKA over all tokens"}),
        ),
        summary=(
            SummaryItem("Where the change is", S.change_location, "cka"),
            SummaryItem("Where it moves the output", S.layer_patch_onset, "layer-patch"),
            SummaryItem("How much the output moves", S.output_divergence, "kl-by-dataset"),
        ),
    ),
    StageReport(
        "transport", "Transport maps", "Linear maps from base to tuned activations, fit on train prompts.",
        tables=(Table("transport", "Map fit per site", metric("transport/*.json"), "json",
                      "One row per site, scored on held-out prompts.",
                      {"r2_val": "share of tuned variance explained, held out",
                       "r2_val_shuffled": "baseline: shuffled pairs",
                       "alpha_auto": "fitted output scale"}),),
        summary=(SummaryItem("How well the maps reconstruct it", S.map_fit, "transport"),),
    ),
    StageReport(
        "patch", "Rank-k mapped patch", "How many map directions carry the change into the output.",
        figures=(Figure("rank-k", "KL drop vs rank k", plot("rank_k.csv"), "k", ("kl_drop",),
                        "Share (%) of the output gap closed when the rank-k mapped base activation replaces the "
                        "re-coloured one in the tuned model (100 = closed, 0 = no better); band = bootstrap CI.",
                        group="site", logx=True, image=plot("rank_k.png")),),
        tables=(
            Table("patch", "Mapped patch per site", metric("patch.json"), "json",
                  "KL raw / mapped at the configured rank, its drop with CI, per-dataset drops, min_k and k_saturated.",
                  {"kl_drop": "% of the gap closed at the configured rank",
                   "min_k": "fewest directions reaching the target drop (-1: none)",
                   "k_saturated": "fewest directions reaching patch.saturation of the best drop of the sweep "
                                  "(where the rank-k curve saturates; -1: no drop)"}),
            Table("alpha", "Alpha sweep", plot("alpha.csv"), "csv", "KL drop per output scale alpha and rank."),
            Table("rank-k-sites", "Rank-k data per site", plot("rank_k"), "files",
                  "The rank-k table split by site (for `dvc plots`)."),
        ),
        summary=(SummaryItem("How many directions carry it", S.directions, "rank-k"),),
    ),
    StageReport(
        "sae", "SAE training", "Sparse autoencoders on base, tuned, delta and crosscoder activations.",
        figures=(Figure("sae-training", "SAE training FVU", plot("sae/*_L*.csv"), "tokens", ("fvu",),
                        "Training FVU against tokens seen, one line per SAE: it should flatten well below 1.",
                        group="file"),),
    ),
    StageReport(
        "sae_eval", "SAE quality", "Held-out reconstruction and splice quality of each SAE.",
        figures=(Figure("crosscoder", "Crosscoder decoder-norm shares", plot("crosscoder_norms.csv"),
                        "rel_norm_tuned", ("n_latents",),
                        "Latents by the tuned share of their decoder norm: 0 = base-only, 1 = tuned-only, "
                        "0.5 = shared.", group="layer", image=plot("crosscoder.png")),),
        tables=(Table("sae-metrics", "SAE metrics", metric("sae.json"), "json",
                      "Per SAE on held-out prompts; crosscoder splice metrics per model (_base / _tuned).",
                      _SAE_COLUMNS),),
        summary=(SummaryItem("How well the SAEs reconstruct it", S.sae_fit, "sae-metrics"),),
    ),
    StageReport(
        "features", "Features", "Which SAE features changed and what they are about.",
        tables=(
            Table("features", "Feature types", metric("features.json"), "json",
                  "Type A = active on base, suppressed on tuned; B = amplified on tuned; C = only on tuned. "
                  "n_cultural_features: features whose mean differs on cultural vs control prompts (permutation "
                  "test, BH)."),
            Table("enrichment-metrics", "Theme enrichment", metric("enrichment.json"), "json",
                  "Per theme: E = share of delta-SAE features in the theme / their overall share; q = BH-adjusted "
                  "p.", {"enrichment": "> 1 = over-represented", "q": "BH-adjusted p-value"}),
            Table("enrichment", "Theme enrichment table", plot("enrichment.csv"), "csv",
                  "The same with chi² statistics and each text theme's top words."),
            Table("graded", "Graded concepts", plot("graded.csv"), "csv",
                  "Best feature per trait scored against graded labels 0-3.",
                  {"r": "Pearson r with the grade", "tpr": "hit rate on grade 3", "fpr": "false alarms on grade 0"}),
            Table("feature-table", "Every feature", plot("feature_table.csv"), "csv",
                  "One row per feature of the base, tuned and delta SAEs: typed features first, then by the size of "
                  "the cultural - control gap.",
                  {"type": "A / B / C, empty for none", "cohens_d": "tuned - base, pooled SD",
                   "freq_delta": "firing rate on tuned - base rows (delta SAE)",
                   "cultural_q": "BH-adjusted permutation p of the cultural - control gap"}),
            Table("graded-top", "Graded concepts: the best features", plot("graded_top.csv"), "csv",
                  "Per trait the features.graded_top best features by score (seed 001's ranked list).",
                  {"rho": "Spearman rho with the grade", "mean_0": "mean activation on grade 0 (mean_1-3 likewise)",
                   "separation": "(mean_3 - mean_0) / SD", "keep": "passes the graded filter"}),
            Table("themes", "Feature themes", plot("themes.md"), "markdown", "Themes by top-activating texts."),
            Table("top-examples", "Top-activating examples", plot("top_examples.md"), "markdown",
                  "The most cultural features and the contexts they fire on (bold = the token)."),
        ),
        summary=(
            SummaryItem("What the features say", S.feature_types, "features"),
            SummaryItem("Which themes hold the change", S.theme_enrichment, "enrichment"),
        ),
    ),
    StageReport(
        "behaviour", "Behaviour", "What the tuned model does differently: marker and refusal rates of its greedy "
        "answers, multiple-choice accuracy, reference-answer log-probability.",
        figures=(Figure("behaviour", "Tuned - base by dataset and metric", plot("behaviour.csv"), "diff", ("label",),
                        "Difference tuned - base of each behaviour metric with its 95% bootstrap CI: the tuned "
                        "behaviour shows as a large marker-rate difference on the target dataset and none elsewhere.",
                        kind="barh", band=("diff_lo", "diff_hi")),),
        tables=(Table("behaviour-metrics", "Behaviour metrics", metric("behaviour.json"), "json",
                      "Per dataset and metric: base, tuned and tuned - base means with 95% bootstrap CIs."),),
        summary=(SummaryItem("What the tuned model does", S.behaviour, "behaviour-metrics"),),
    ),
    StageReport(
        "steer", "Steering and ablation", "Whether a few directions cause the tuned behaviour: added to the base "
        "(steer) they reproduce it, removed from the tuned model (ablate) they take it away.",
        figures=(
            Figure("steer-k", "Effect and side effects vs k", plot("steer_k.csv"), "k",
                   ("effect_test", "ppl_change", "mc_drop"),
                   "At each k's alpha (chosen on dev), one line per configuration and operation: effect_test = "
                   "share of the behaviour gap closed (steer) or removed (ablate) on test prompts; ppl_change = "
                   "relative perplexity change of neutral continuations (budget steer.ppl_budget); mc_drop = "
                   "neutral multiple-choice accuracy lost (budget steer.mc_budget).", group="series"),
            Figure("steer-alpha", "Effect vs alpha", plot("steer_alpha.csv"), "alpha", ("effect_test",),
                   "Test effect against the strength alpha at the reported k.", group="series"),
        ),
        tables=(
            Table("steer-metrics", "Steering metrics", metric("steer.json"), "json",
                  "Per configuration: min k, the reported k and alpha, effect and KL share with 95% CIs, side "
                  "effects, conditional (probe-gated) steering, effect per template family."),
            Table("steer-grid", "Every (k, alpha)", plot("steer_grid.csv"), "csv",
                  "Dev and test effect, KL share and side effects of every cell of the sweep."),
        ),
        summary=(SummaryItem("Do a few directions cause it", S.steering, "steer-metrics"),),
    ),
    StageReport(
        "geometry", "Concept geometry", "Categorical and hierarchical concepts under the causal inner product of "
        "each model's unembedding (Park et al. 2024), and which concepts the tuning moved.",
        figures=(
            Figure("geometry-angles", "Parent vs child-delta angle, real and controls", plot("geometry_summary.csv"),
                   "median_angle", ("label",),
                   "Median angle between a parent's vector and (child - parent): about 90 degrees is hierarchical "
                   "orthogonality. Controls: shuffled unembedding rows, random parents (a random token set of the "
                   "same size), the Euclidean (unwhitened) inner product, the plain-mean estimator, and the "
                   "context-side vectors.", kind="barh"),
            Figure("geometry-cos", "Cosines between concept vectors (base)", plot("geometry_cos.csv"), "col",
                   ("cos",), "Cosine between every pair of concept vectors in the causal space; children sit "
                   "near their parent, different parents near 0.", group="row", kind="heatmap"),
            Figure("geometry-moved", "Which parents the tuning moved", plot("geometry_parents.csv"), "shift",
                   ("concept",), "Relative shift ||l_tuned - l_base|| / ||l_base|| of each parent's context vector "
                   "(the final hidden state at its words in short contexts), largest first.", kind="barh"),
        ),
        tables=(
            Table("geometry-metrics", "Geometry metrics", metric("geometry.json"), "json",
                  "Per model: whitening check (max |Cov(g) - I|), word coverage, median angles with controls, "
                  "separation AUC of held-out words, the children's polytopes, parent and child interventions, "
                  "context vectors; pair: "
                  "unembedding and context cosines, most moved concepts."),
            Table("geometry-angles-table", "Every angle", plot("geometry_angles.csv"), "csv",
                  "Parent vs (child - parent) and (child - sibling) angles per model, real and each control."),
            Table("geometry-pair", "Per concept across the pair", plot("geometry_pair.csv"), "csv",
                  "Cosines of base and tuned vectors (unembedding, context side), the context shift and the "
                  "child angle in each model."),
            Table("geometry-concepts", "Separation and intervention per concept", plot("geometry_concepts.csv"),
                  "csv", "AUC of held-out words' projections against random tokens; for parents, the "
                  "intervention's effect (nats) on their held-out words and its leakage to other parents."),
            Table("geometry-polytope", "Children as the vertices of a simplex", plot("geometry_polytope.csv"), "csv",
                  "Per parent: smallest / largest singular value of its children's vectors (> 0: a (k-1)-simplex), "
                  "the share of held-out child words whose largest least-squares coordinate is their own vertex "
                  "(against chance 1/k) and their median own-vertex coordinate (1: at the vertex)."),
            Table("geometry-children", "Child interventions and sibling ratios", plot("geometry_children.csv"), "csv",
                  "Per child: a push along l_child - l_parent, its effect (nats) on its own held-out words over its "
                  "siblings', leakage, and how much it changes the siblings' log-probability ratios (ratio_child) "
                  "against the parent's push of the same size (ratio_parent: ~0 when the parent leaves them alone)."),
        ),
        summary=(SummaryItem("Is the concept geometry there, and did it move", S.geometry, "geometry-metrics"),),
    ),
    StageReport(
        "hsae", "Hierarchical SAEs", "Parent latents with one child each (Muchane et al. 2025), random vs teacher "
        "initialisation from the concept geometry, on base and tuned activations.",
        figures=(
            Figure("hsae-purity", "Parent purity by model and initialisation", plot("hsae_summary.csv"), "purity",
                   ("label",), "Mean over concept parents of the matched latent's code on its own contexts over "
                   "its code on its own and others' contexts (0.5 = no preference, 1 = pure).", kind="barh"),
            Figure("hsae-children", "Which parents' children the tuning changed", plot("hsae_pair.csv"),
                   "children_cos", ("concept",), "Mean best |cosine| between the base and tuned teacher H-SAEs' "
                   "child atoms under each concept parent; lowest first.", kind="barh"),
        ),
        tables=(
            Table("hsae-metrics", "H-SAE metrics", metric("hsae.json"), "json",
                  "Per model and variant: FVU, L0, dead %, CE/KL recovered, purity, leakage, recall, steering "
                  "effect and leakage; the seed's targets (teacher vs random) met or missed.",
                  {"purity": "own-context code share, 0.5 = none, 1 = pure", "leakage": "share of other parents' "
                   "contexts the parent latent fires on; lower is better", "l0": "active parents + children per row"}),
            Table("hsae-concepts", "Per concept parent", plot("hsae_concepts.csv"), "csv",
                  "Matched latent, purity, leakage, recall and steering numbers per concept parent."),
        ),
        summary=(SummaryItem("Does the geometry teach a better H-SAE", S.hsae, "hsae-metrics"),),
    ),
    StageReport(
        "heads", "Attention heads", "Which heads carry the tuned behaviour (the log-prob of the target "
        "continuation): grad x act per head in each model, how the ranking churned, and head patching as the check.",
        figures=(
            Figure("heads-dz", "Change of each head's attribution z-score (tuned - base)", plot("heads_dz.csv"),
                   "head", ("dz",), "z_tuned - z_base per head (rows: layers). Churn counts the heads beyond "
                   "heads.z_threshold; a few dark cells = a concentrated change, many = a distributed one.",
                   group="layer", kind="heatmap"),
            Figure("heads-base", "Head attribution z-scores, base", plot("heads_base.csv"), "head", ("z_base",),
                   "grad x act of each head's output on the target log-prob, as z-scores over the base model's heads.",
                   group="layer", kind="heatmap"),
            Figure("heads-tuned", "Head attribution z-scores, tuned", plot("heads_tuned.csv"), "head", ("z_tuned",),
                   "The same in the tuned model.", group="layer", kind="heatmap"),
            Figure("heads-curve", "Cumulative head patching", plot("heads_curve.csv"), "n_heads",
                   ("share", "kl_share"), "Share of the base -> tuned gap in the target log-prob closed (and of the "
                   "KL to the tuned model removed) when the top n heads are patched into the "
                   "base together (ordered by heads.rank_by).", logx=True),
        ),
        tables=(
            Table("heads-metrics", "Head metrics", metric("heads.json"), "json",
                  "Churn (share of heads with |dz| > heads.z_threshold; churn_abs: |delta attribution| > "
                  "heads.abs_threshold), top-k Jaccard, Spearman of attribution against measured patch and "
                  "ablation effects, heads for the target share of the gap.",
                  {"spearman_patch": "|delta attribution| vs |patch share| over the patched heads",
                   "spearman_pred": "attribution-patching estimate vs patch share",
                   "spearman_direct": "direct estimate (the head's own change) vs patch share",
                   "top_direct": "heads of largest |direct estimate|: the heads whose own weights carry the change"}),
            Table("heads-patch", "Single-head patching and ablation", plot("heads_patch.csv"), "csv",
                  "Top heads by heads.rank_by and a random sample of the others: the tuned head's write patched into "
                  "the base (share of the gap closed, KL to tuned), and zeroed in the tuned model.",
                  {"patch_share": "share of the base -> tuned gap the patch closes",
                   "zero_share": "share of the gap removed by zeroing the head in the tuned model",
                   "pred": "attribution-patching estimate of the patch effect (nats)",
                   "direct": "the same for the head's own change alone (0 for a head whose weights and layer norm did "
                             "not change)"}),
            Table("heads-all", "Every head", plot("heads_attribution.csv"), "csv",
                  "Attribution in base and tuned, delta, z-scores and the attribution-patching estimates (pred, "
                  "direct) per head."),
        ),
        summary=(SummaryItem("Few heads or many", S.heads, "heads-metrics"),),
    ),
    StageReport(
        "gates", "Feature gates", "Which SAE features are identifiable and causal (seed 000 phases 4-5): a funnel of "
        "cheap gates (distribution variance, sparsity, region coverage), then, on the top survivors, causal "
        "sufficiency by ablation, consistency under three corruptions and side effects, and the CCIS.",
        tables=(
            Table("gates-metrics", "Gate funnel and CCIS", metric("gates.json"), "json",
                  "Features passing each gate (all SAEs and per source), the CCIS count, survivors and flagged "
                  "backup-pathway illusions, and the settings."),
            Table("gates-funnel", "Funnel", plot("gates_funnel.csv"), "csv", "Features left after each gate."),
            Table("gates-features", "Measured features", plot("gates_features.csv"), "csv",
                  "Every feature that reached the model-based gates, with every number.",
                  {"effect": "relative change of the signature probability when the feature is ablated",
                   "kl": "decision-token KL(clean || ablated), nats", "p": "permutation p-value of the effect",
                   "ccis": "effect x identifiability / (semantic + task loss + illusion penalty)"}),
            Table("gates-corruptions", "Corruption effect sizes", plot("gates_corruptions.csv"), "csv",
                  "Cohen's d of each measured feature's activation, clean vs corrupted, per corruption method."),
        ),
        summary=(SummaryItem("Which features pass the gates", S.gates, "gates-metrics"),),
    ),
    StageReport(
        "probes", "Probes", "Where each model linearly encodes the concepts (seed 001 stages 4-5): grouped-CV "
        "probes by layer for base and tuned, SAE features predicted from hidden states and input embeddings, and "
        "SAEBench sparse probing of each SAE.",
        figures=(Figure("probes-layers", "Probe score by layer, base and tuned", plot("probes_layers.csv"), "layer",
                        ("test",), "Held-out test accuracy (concepts) or R² (features) of the probe at each "
                        "layer; one panel per task, base and tuned on the same axes: where the curves part, the "
                        "tuned model encodes the concept differently.", group="model",
                        image=plot("probes_layers.png")),),
        tables=(
            Table("probes-metrics", "Probe metrics", metric("probes.json"), "json",
                  "Per task: best layer by CV and its test score per model, tuned - base, the four estimators at "
                  "the SAE layer, a shuffled-label control; per SAE: sparse probing and reconstruction bias."),
            Table("probes-sparse", "SAE sparse probing", plot("probes_sparse.csv"), "csv",
                  "Test accuracy of a logistic probe on the top-k latents by mean difference (k = 1, 2, 5; "
                  "dense = all input dimensions)."),
        ),
        summary=(SummaryItem("Where the concepts are encoded", S.probes, "probes-metrics"),),
    ),
    StageReport(
        "feature_pages", "Feature pages", "A page per reported feature (gated, top cultural, top graded): "
        "top contexts with the activating tokens highlighted, activation histogram, firing rate per dataset and "
        "region, base vs tuned activation, the tokens its decoder direction promotes and suppresses, gate results.",
        tables=(
            Table("feature-pages", "Feature pages", plot("feature_pages"), "files",
                  "Open index.html for the list; each page is self-contained static HTML."),
            Table("feature-tokens", "Token-by-token activations", plot("feature_tokens"), "images",
                  "Each reported feature's activation on every token of its top prompts."),
        ),
    ),
)


def all_refs() -> list[tuple[str, Ref]]:
    """(stage, declared file) for every file the registry shows."""
    return [(st.stage, ref) for st in STAGES for ref in st.refs]
