"""Identifiability gates over the base, tuned and delta SAEs (seed 000 phases 4-5) and the CCIS.

The funnel, cheap gates first (activations from the stores), then the model-based ones on the survivors (per SAE at most
`max_features`, by distribution variance):

1. distribution variance: each feature's mean activation on its own source's rows and its matched counterparts'
   (best |decoder cosine| >= match_cos in the other two SAEs, 0 where none) on theirs; the variance of the three
   means (ddof=0); the top `top_share` of all features pass;
2. sparsity: token-level firing frequency on held-out cultural prompts in (0, max_freq);
3. coverage (the seed's DOSA check): fires on held-out cultural prompts of >= min_regions regions (pan-Indian
   entities are not a region);
4. causal sufficiency: the feature's contribution z_i * W_dec_i removed at every position from the SAEs' first (after the sink and the prompts' shared opening) of the
   site in its model (base SAE -> base model, tuned and delta SAEs -> tuned model; a delta feature's z_i is read
   from tuned - base activations of the same tokens), the SAE error kept; effect E = relative change of the mean
   signature first-token probability at the decision token over its prompts, KL(clean || ablated) there too;
   passes when E > min_effect or mean KL > min_kl;
5. corruption consistency: Cohen's d of the feature's per-prompt activation (max over tokens), clean vs each
   corruption of its prompts; consistent when mean d > d_min and SD (ddof=0) < sd_max, else flagged as a possible
   backup-pathway illusion;
6. side effects: the same ablation on neutral prompts and neutral multiple-choice questions; passes when the
   relative accuracy change and the absolute change of the neutral signature rate are below `side_budget`.

CCIS = E * I / (S + T + P + eps): I identifiability (mean of the variance percentile, the sparsity margin and the
region share), S the mean neutral decision-token KL, T the relative neutral accuracy change, P the illusion
penalty SD_d + max(0, d_min - mean d). Its p-value permutes the target (cultural, fires) vs control labels of the
causal pool. Definitions in docs/ALGORITHMS.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mechdiff.analysis.behaviour import decision_logits, mc_correct, option_logprobs
from mechdiff.analysis.features import cohens_d, decoder_dirs
from mechdiff.analysis.gate_settings import GateSettings
from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site, capture, edit_at, keep_block_outputs, read_at, reuse_blocks
from mechdiff.model.tokens import Encoded, batches
from mechdiff.resume import UnitsFn, compute_all
from mechdiff.sae.sources import encode_rows, first_position, read_source, rows_of
from mechdiff.stats.kl import kl_divergence, log_softmax

GATE_SOURCES = ("base", "tuned", "delta")
FUNNEL = ("candidates", "variance", "sparsity", "coverage", "measured", "causal", "consistent", "side_effects")
PAN_INDIAN = "pan-Indian"


# ---------------------------------------------------------------- cheap gates (numpy)


def _unit(M: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(M, axis=1, keepdims=True)
    return M / np.where(n > 0, n, 1.0)


def best_matches(dirs_a: np.ndarray, dirs_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of dirs_a (F_a, d): the index of the row of dirs_b (F_b, d) with the largest |cosine|, and it."""
    A, B = np.asarray(dirs_a, dtype=np.float64), np.asarray(dirs_b, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1] or not len(A) or not len(B):
        raise MechdiffError(f"decoder directions must be non-empty (F, d) arrays of one width, got {A.shape}, {B.shape}")
    C = np.abs(_unit(A) @ _unit(B).T)
    j = C.argmax(1)
    return j, C[np.arange(len(A)), j]


def distribution_variance(dirs: dict[str, np.ndarray], means: dict[str, np.ndarray], *, match_cos: float
                          ) -> dict[str, np.ndarray]:
    """Per SAE and feature, the variance (ddof=0) over the sources of [own mean activation, each other SAE's
    matched counterpart's mean activation (0 without a counterpart of |cos| >= match_cos)]."""
    if set(dirs) != set(means) or len(dirs) < 2:
        raise MechdiffError(f"distribution variance needs >= 2 SAEs with directions and means, got {sorted(dirs)}, "
                            f"{sorted(means)}")
    out = {}
    for s in dirs:
        cols = [np.asarray(means[s], dtype=np.float64)]
        for t in dirs:
            if t == s:
                continue
            j, c = best_matches(dirs[s], dirs[t])
            cols.append(np.where(c >= match_cos, np.asarray(means[t], dtype=np.float64)[j], 0.0))
        out[s] = np.var(np.stack(cols, 1), axis=1)
    return out


def top_share(values: np.ndarray, share: float) -> np.ndarray:
    """bool mask of the ceil(share * n) largest values (ties at the cut all kept)."""
    v = np.asarray(values, dtype=np.float64)
    k = max(1, int(np.ceil(share * v.size)))
    cut = np.sort(v)[::-1][k - 1]
    return v >= cut


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Share of values strictly below each value, in [0, 1)."""
    v = np.asarray(values, dtype=np.float64)
    return np.searchsorted(np.sort(v), v, side="left") / v.size


def region_coverage(fires: np.ndarray, regions: Sequence[str], *, ignore: Sequence[str] = (PAN_INDIAN,)
                    ) -> np.ndarray:
    """Per feature, the number of distinct regions (labels not in `ignore`) of the prompts it fires on.

    fires: bool (n_prompts, F); regions: one label per prompt ("" = unknown, never counted)."""
    F = np.asarray(fires, dtype=bool)
    r = np.asarray(regions, dtype=object)
    if F.ndim != 2 or F.shape[0] != r.size:
        raise MechdiffError(f"fires {F.shape} needs one row per region label ({r.size})")
    labels = sorted({x for x in r if x and x not in ignore})
    if not labels:
        return np.zeros(F.shape[1], dtype=np.int64)
    return np.stack([F[r == lab].any(0) for lab in labels]).sum(0).astype(np.int64)


def corruption_consistency(clean: np.ndarray, corrupted: dict[str, np.ndarray], *, d_min: float = 0.8,
                           sd_max: float = 0.3) -> dict[str, Any]:
    """Cohen's d (clean - corrupted, pooled SD) of one feature's per-prompt activations per corruption method;
    consistent when mean d > d_min and SD (ddof=0) across methods < sd_max (undefined d -> inconsistent)."""
    a = np.asarray(clean, dtype=np.float64).ravel()
    ds = {}
    for m, b in corrupted.items():
        b = np.asarray(b, dtype=np.float64).ravel()
        ds[m] = float(cohens_d(b, a)[0]) if a.size + b.size >= 3 else float("nan")
    vals = np.array(list(ds.values()))
    ok = vals.size > 0 and bool(np.isfinite(vals).all())
    mean = float(vals.mean()) if ok else float("nan")
    sd = float(vals.std()) if ok else float("nan")
    return {"d": ds, "mean_d": mean, "sd_d": sd, "consistent": bool(ok and mean > d_min and sd < sd_max)}


def relative_change(clean: np.ndarray, ablated: np.ndarray, *, floor: float = 0.0) -> float:
    """|mean ablated - mean clean| / mean clean; 0 when the clean mean is below `floor` (or 0)."""
    c, a = float(np.mean(clean)), float(np.mean(ablated))
    return abs(a - c) / c if c > 0 and c >= floor else 0.0


def permutation_p(clean: np.ndarray, ablated: np.ndarray, target: np.ndarray, *, n_perm: int, seed: int,
                  floor: float = 0.0) -> tuple[float, float]:
    """(observed relative change on the target prompts, permutation p): target vs control labels permuted over the
    pool, p = (1 + #{perm >= obs}) / (n_perm + 1)."""
    c, a = np.asarray(clean, dtype=np.float64), np.asarray(ablated, dtype=np.float64)
    t = np.asarray(target, dtype=bool)
    if not (c.shape == a.shape == t.shape) or c.ndim != 1:
        raise MechdiffError(f"permutation_p: clean {c.shape}, ablated {a.shape}, labels {t.shape} must be equal 1-D")
    n1 = int(t.sum())
    if n1 == 0:
        return 0.0, 1.0
    obs = relative_change(c[t], a[t], floor=floor)
    rng = np.random.default_rng(seed)
    M = np.zeros((n_perm, c.size))
    for i in range(n_perm):
        M[i, rng.permutation(c.size)[:n1]] = 1.0
    mc, ma = M @ c / n1, M @ a / n1
    with np.errstate(divide="ignore", invalid="ignore"):
        null = np.where((mc > 0) & (mc >= floor), np.abs(ma - mc) / mc, 0.0)
    return obs, float((1 + (null >= obs - 1e-12).sum()) / (n_perm + 1))


def ccis(effect: float, identifiability: float, semantic: float, task: float, illusion: float, *,
         eps: float = 0.01) -> float:
    """CCIS = effect * identifiability / (semantic loss + task loss + illusion penalty + eps)."""
    den = semantic + task + illusion + eps
    return float(effect * identifiability / den) if np.isfinite(den) else 0.0


# ---------------------------------------------------------------- model-based measurements


def feature_contribution(sae, i: int) -> torch.Tensor:
    """The raw-space (d,) contribution of one unit of latent i: decode(e_i) - decode(0)."""
    with torch.no_grad():
        return (sae.dec[int(i)] / sae.scale()).detach().float()


def ablation(site: Site, Z: torch.Tensor, contrib: torch.Tensor) -> Callable:
    """An `intervene` that subtracts Z[b, t] * contrib from the site's activation of the one batch laid out as Z."""

    def intervene(model: nn.Module, _start: torch.Tensor):
        def fn(t: torch.Tensor) -> torch.Tensor:
            if tuple(t.shape[:2]) != tuple(Z.shape):
                raise MechdiffError(f"ablation laid out for {tuple(Z.shape)} met a batch of {tuple(t.shape[:2])}")
            return t - Z.to(t.dtype)[..., None] * contrib.to(t)

        return edit_at(model, site, fn)

    return intervene


def _cut(out: Any, sel: torch.Tensor, T: int) -> Any:
    """Batch rows `sel`, first T positions, of a kept block output (a tensor, or a tuple led by the hidden state)."""
    if isinstance(out, torch.Tensor):
        return out[sel, :T]
    return type(out)((out[0][sel, :T], *out[1:]))


class Pass:
    """One single-batch, right-padded model call, run clean once (site activations and block outputs kept) and then
    with ablations, reusing the blocks before the site's layer (exact: nothing before them changes).

    `run(sel, intervene)` runs the batch rows `sel` (a sorted subset of the clean batch's rows, in its order;
    None = all) as one batch; `lengths` are the rows' token counts, when subsets are allowed.
    """

    def __init__(self, model: nn.Module, site: Site, run: Callable[[np.ndarray | None, Callable | None], Any],
                 lengths: np.ndarray | None = None) -> None:
        self.model, self.site, self.run, self.lengths = model, site, run, lengths
        kept: list = []
        acts: list = []
        with keep_block_outputs(model, kept), read_at(model, site, acts.append):
            self.clean = run(None, None)
        if len(acts) != 1:
            raise MechdiffError(f"a gate pass must run the model once, ran it {len(acts)} times")
        self.acts = acts[0]  # (B, T, d) clean site activations in the batch's layout
        self.kept = kept[: site.layer]

    def ablated(self, Z: torch.Tensor, contrib: torch.Tensor, sel: np.ndarray | None = None) -> Any:
        """The call with Z (B, T) x contrib removed at the site; with `sel` only those rows run (the others must
        have Z = 0: their output is the clean one)."""
        if sel is None:
            with reuse_blocks(self.model, self.kept, self.site.layer):
                return self.run(None, ablation(self.site, Z, contrib))
        if self.lengths is None:
            raise MechdiffError("this gate pass cannot run a subset of its rows")
        sel = np.asarray(sel, dtype=np.int64)
        out = self.clean.copy()
        if sel.size == 0:
            return out
        T = int(self.lengths[sel].max())
        idx = torch.as_tensor(sel)
        with reuse_blocks(self.model, [_cut(k, idx, T) for k in self.kept], self.site.layer):
            out[sel] = self.run(sel, ablation(self.site, Z[idx, :T], contrib))
        return out


def _latents(sae, X: torch.Tensor, features: Sequence[int], skip: int = 1) -> torch.Tensor:
    """(B, T, len(features)) latents of activations X (B, T, d); 0 before position `skip` (the sink and the
    prompts' shared prefix: rows the SAE was not trained on, `sae.sources.source_rows`)."""
    B, T, d = X.shape
    Z = torch.as_tensor(encode_rows(sae, X.reshape(-1, d).numpy(), features=np.asarray(features, dtype=np.int64)))
    Z = Z.reshape(B, T, -1).clone()
    Z[:, :skip] = 0
    return Z


def _sorted(enc: Encoded, rows: np.ndarray) -> np.ndarray:
    """Rows in the order a single sorted batch takes them (`tokens.batches`, stable by length)."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows[np.argsort(enc.lengths[rows], kind="stable")]


def site_acts(model: nn.Module, enc: Encoded, rows: np.ndarray, site: Site, *, batch_size: int = 16
              ) -> list[torch.Tensor]:
    """Per prompt of `rows` (in order) its (T_p, d) clean site activations (`capture`, stops after the site)."""
    out: dict[int, torch.Tensor] = {}
    for rr, ids, mask, _ in batches(enc, rows, batch_size, enc.pad):
        acts, _ = capture(model, ids, mask, [site])
        a = acts[site.name].float()
        for b, r in enumerate(rr):
            out[int(r)] = a[b, : len(enc.ids[r])]
    return [out[int(r)] for r in rows]


def _prompt_max(sae, acts: list[torch.Tensor], feats: Sequence[int], base_acts: list[torch.Tensor] | None = None,
                skip: int = 1) -> np.ndarray:
    """(n_prompts, len(feats)) max over each prompt's tokens from position `skip` on (as `_latents`) of the
    latents (from its last token on for a prompt no longer than `skip`)."""
    out = []
    for i, a in enumerate(acts):
        x = a if base_acts is None else a - base_acts[i]
        z = encode_rows(sae, x[min(skip, len(x) - 1):].numpy(), features=np.asarray(feats, dtype=np.int64))
        out.append(z.max(0) if len(z) else np.zeros(len(feats), dtype=np.float32))
    return np.stack(out)


@dataclass
class GateInputs:
    """Everything the gates read, already loaded (the stage builds it from the stores, SAEs, models, prompts)."""

    saes: dict  # {"base" | "tuned" | "delta": TopKSAE}
    base: Any  # ActStore
    tuned: Any  # ActStore
    site: Site
    view: str
    regions: np.ndarray  # region label per prompt (store row order), "" when unknown
    train_rows: np.ndarray  # train cultural prompt rows (mean activations)
    heldout_rows: np.ndarray  # held-out cultural prompt rows (sparsity, coverage)
    models: dict  # {"base": model, "tuned": model}
    enc: Encoded  # every prompt (store row order), one tokenizer for both models
    tokenizer: Any
    signature_id: int  # first token of the signature (behaviour metric)
    target_rows: np.ndarray  # causal pool: held-out cultural prompt rows (capped)
    control_rows: np.ndarray  # causal pool: held-out control prompt rows (capped)
    corrupted: dict[str, list[str]]  # method -> corrupted text per target row
    neutral_rows: np.ndarray  # side effects: neutral prompt rows
    mc: tuple[list[str], list[list[str]], list[int]]  # side effects: neutral multiple choice
    chat: bool = True
    max_len: int = 128


@dataclass
class GateResults:
    funnel: dict = field(default_factory=dict)
    funnel_by_source: dict = field(default_factory=dict)
    features: list = field(default_factory=list)  # one row per measured feature
    survivors: list = field(default_factory=list)
    corruption_rows: list = field(default_factory=list)
    n_ccis: int = 0
    n_ccis_survivors: int = 0
    settings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def metrics_json(self) -> dict:
        return {"funnel": self.funnel, "funnel_by_source": self.funnel_by_source, "n_ccis_significant": self.n_ccis,
                "n_ccis_significant_survivors": self.n_ccis_survivors, "n_survivors": len(self.survivors),
                "survivors": self.survivors, "flagged_illusions": [f"{r['source']}:{r['feature']}" for r in self.features
                                                                   if r["measured"] and not r["consistent"]],
                "settings": self.settings, "seconds": self.seconds}

    def funnel_rows(self) -> list[dict]:
        return [{"gate": g, "n": n, **{s: f.get(g) for s, f in self.funnel_by_source.items()}}
                for g, n in self.funnel.items()]


def _model_of(src: str) -> str:
    return "base" if src == "base" else "tuned"


def cheap_gates(inp: GateInputs, st: GateSettings) -> dict[str, dict[str, np.ndarray]]:
    """Per SAE source: variance, variance pass, freq, sparsity pass, regions, coverage pass (numpy arrays (F,))."""
    srcs = [s for s in GATE_SOURCES if s in inp.saes]
    rng = np.random.default_rng(st.seed)
    out: dict[str, dict[str, np.ndarray]] = {}
    means, dirs = {}, {}
    for s in srcs:
        rows = rows_of(s, inp.base, inp.tuned, inp.view, inp.train_rows)
        if len(rows) > st.max_rows:
            rows = np.sort(rng.choice(rows, size=st.max_rows, replace=False))
        means[s] = encode_rows(inp.saes[s], read_source(s, inp.base, inp.tuned, inp.site.name, inp.view, rows)).mean(0)
        dirs[s] = decoder_dirs(inp.saes[s])
    var = distribution_variance(dirs, means, match_cos=st.match_cos) if len(srcs) > 1 else {srcs[0]: means[srcs[0]] ** 2}
    allv = np.concatenate([var[s] for s in srcs])
    keep = top_share(allv, st.top_share)
    pr = percentile_rank(allv)
    off = 0
    held = np.asarray(inp.heldout_rows, dtype=np.int64)
    for s in srcs:
        F = len(var[s])
        rows = rows_of(s, inp.base, inp.tuned, inp.view, held)
        Z = encode_rows(inp.saes[s], read_source(s, inp.base, inp.tuned, inp.site.name, inp.view, rows)) > 0
        owner = (inp.tuned if s == "tuned" else inp.base).index("tok_prompt")[rows] if inp.view == "tokens" else rows
        freq = Z.mean(0)
        pos = {int(p): k for k, p in enumerate(held)}
        fires = np.zeros((len(held), F), dtype=bool)
        np.logical_or.at(fires, np.array([pos[int(o)] for o in owner]), Z)
        n_reg = region_coverage(fires, inp.regions[held])
        n_all = len({x for x in inp.regions[held] if x and x != PAN_INDIAN})
        out[s] = {"variance": var[s], "variance_pct": pr[off : off + F], "pass_variance": keep[off : off + F],
                  "freq": freq, "pass_sparsity": (freq > 0) & (freq < st.max_freq), "regions": n_reg,
                  "region_share": n_reg / max(n_all, 1), "pass_coverage": n_reg >= st.min_regions}
        off += F
    return out


def run_gates(inp: GateInputs, st: GateSettings | None = None, *, progress: Callable[[str], None] | None = None,
              units: UnitsFn = compute_all) -> GateResults:
    """The whole funnel (module docstring): cheap gates on every feature, model-based gates on the survivors.
    `units` (`resume.Units`) keeps each measured feature's result, so an interrupted run resumes. `st`: the
    seed's settings when None."""
    import time

    st = GateSettings() if st is None else st
    say = progress or (lambda _m: None)
    t0 = time.time()
    res = GateResults(settings=asdict(st))
    cheap = cheap_gates(inp, st)
    srcs = list(cheap)
    tot = {k: sum(int(np.sum(cheap[s][k])) for s in srcs) for k in ("pass_variance",)}
    m_var = {s: cheap[s]["pass_variance"] for s in srcs}
    m_sp = {s: m_var[s] & cheap[s]["pass_sparsity"] for s in srcs}
    m_cov = {s: m_sp[s] & cheap[s]["pass_coverage"] for s in srcs}
    res.funnel = {"candidates": sum(len(cheap[s]["variance"]) for s in srcs), "variance": tot["pass_variance"],
                  "sparsity": sum(int(m_sp[s].sum()) for s in srcs), "coverage": sum(int(m_cov[s].sum()) for s in srcs)}
    cand = [c for s in srcs for c in sorted(((float(cheap[s]["variance"][i]), s, int(i))
                                             for i in np.flatnonzero(m_cov[s])), reverse=True)[: st.max_features]]
    res.funnel["measured"] = len(cand)
    res.funnel_by_source = {s: {"candidates": len(cheap[s]["variance"]), "variance": int(m_var[s].sum()),
                                "sparsity": int(m_sp[s].sum()), "coverage": int(m_cov[s].sum()),
                                "measured": sum(c[1] == s for c in cand)} for s in srcs}
    res.seconds["cheap"] = time.time() - t0
    say(f"cheap gates: {res.funnel}")
    if cand:
        _model_gates(inp, st, cheap, cand, res, say, units)
    res.seconds["total"] = time.time() - t0
    return res


def _model_gates(inp: GateInputs, st: GateSettings, cheap: dict, cand: list, res: GateResults,
                 say: Callable[[str], None], units: UnitsFn) -> None:
    """Causal sufficiency on the pool for every measured feature; corruptions and side effects for the features
    that pass it or whose CCIS could still exceed ccis_min (effect x identifiability / eps > ccis_min, p < alpha);
    the others get NaN there and their CCIS upper bound."""
    import time

    from mechdiff.model.tokens import encode

    t0 = time.time()
    site, enc, sig = inp.site, inp.enc, inp.signature_id
    skip = first_position(inp.base)  # the SAEs' first trained position (the stores share one tokenizer here)
    pool = _sorted(enc, np.concatenate([inp.target_rows, inp.control_rows]))
    is_target = np.isin(pool, inp.target_rows)
    neutral = _sorted(enc, inp.neutral_rows)
    questions, choices, answers = inp.mc
    n_seq = sum(len(c) for c in choices)
    pidx = {int(r): k for k, r in enumerate(pool)}
    ti = np.array([pidx[int(r)] for r in inp.target_rows], dtype=np.int64)  # corrupted lists follow target_rows
    passes: dict[tuple[str, str], Pass] = {}
    cor_acts: dict[tuple[str, str], list[torch.Tensor]] = {}

    def get_pass(m: str, kind: str) -> Pass:
        if (m, kind) not in passes:
            model = inp.models[m]
            if kind == "pool":
                passes[m, kind] = Pass(model, site, lambda sel, iv: decision_logits(
                    model, enc, pool if sel is None else pool[sel], batch_size=len(pool), intervene=iv),
                    lengths=enc.lengths[pool])
            elif kind == "neutral":
                passes[m, kind] = Pass(model, site, lambda sel, iv: decision_logits(
                    model, enc, neutral if sel is None else neutral[sel], batch_size=len(neutral), intervene=iv),
                    lengths=enc.lengths[neutral])
            else:
                passes[m, kind] = Pass(model, site, lambda _sel, iv: option_logprobs(
                    model, inp.tokenizer, questions, choices, chat=inp.chat, max_len=inp.max_len + 64,
                    batch_size=n_seq, intervene=iv))
        return passes[m, kind]

    def get_cor(m: str, meth: str) -> list[torch.Tensor]:
        if (m, meth) not in cor_acts:
            texts = inp.corrupted[meth]
            e = encode(inp.tokenizer, texts, chat=inp.chat, max_len=inp.max_len)
            cor_acts[m, meth] = site_acts(inp.models[m], e, np.arange(len(texts)), site, batch_size=st.batch_size)
        return cor_acts[m, meth]

    def p_sig(logits: np.ndarray) -> np.ndarray:
        return np.exp(log_softmax(logits)[:, sig])

    def latents(kind: str, src: str, feat: int) -> torch.Tensor:
        X = get_pass(_model_of(src), kind).acts.float()
        if src == "delta":  # the delta feature reads tuned - base activations of the same tokens
            X = X - get_pass("base", kind).acts.float()
        return _latents(inp.saes[src], X, [feat], skip)[..., 0]

    nan = float("nan")

    def measure(var: float, src: str, feat: int) -> tuple[dict, list[dict]]:
        """One measured feature: its row and its corruption rows."""
        cor_rows: list[dict] = []
        t1 = time.time()
        mdl = _model_of(src)
        contrib = feature_contribution(inp.saes[src], feat)
        ch = cheap[src]
        ident = float(np.mean([ch["variance_pct"][feat], max(0.0, 1 - ch["freq"][feat] / st.max_freq),
                               min(1.0, ch["region_share"][feat])]))
        # causal sufficiency on the pool: only rows where it fires change
        Pp = get_pass(mdl, "pool")
        Z = latents("pool", src, feat)
        fires = (Z.amax(1) > 0).numpy()
        mine = is_target & fires
        abl = Pp.ablated(Z, contrib, np.flatnonzero(fires))
        pc, pa = p_sig(Pp.clean), p_sig(abl)
        kl = kl_divergence(Pp.clean.astype(np.float64), abl.astype(np.float64))
        effect, p_val = permutation_p(pc, pa, mine, n_perm=st.n_perm, seed=st.seed, floor=st.prob_floor)
        kl_mine = float(kl[mine].mean()) if mine.any() else 0.0
        causal = bool(mine.any() and (effect > st.min_effect or kl_mine > st.min_kl))
        upper = effect * ident / st.ccis_eps
        row = {"source": src, "feature": feat, "variance": var, "freq": float(ch["freq"][feat]),
               "regions": int(ch["regions"][feat]), "n_prompts": int(mine.sum()),
               "p_signature_clean": float(pc[mine].mean()) if mine.any() else nan, "effect": effect, "kl": kl_mine,
               "causal": causal, "identifiability": ident, "p": p_val, "ccis_upper": upper}
        if causal or (upper > st.ccis_min and p_val < st.alpha):
            # corruption consistency on its prompts (the target prompts it fires on)
            own, cl = fires[ti], Z.amax(1).numpy()[ti]
            cors = {meth: _prompt_max(inp.saes[src], get_cor(mdl, meth), [feat],
                                      get_cor("base", meth) if src == "delta" else None, skip)[:, 0][own]
                    for meth in inp.corrupted}
            cc = corruption_consistency(cl[own], cors, d_min=st.d_min, sd_max=st.sd_max)
            # side effects: neutral prompts (KL, signature rate) and neutral multiple choice (accuracy)
            Pn = get_pass(mdl, "neutral")
            Zn = latents("neutral", src, feat)
            an = Pn.ablated(Zn, contrib, np.flatnonzero((Zn.amax(1) > 0).numpy()))
            sem = float(kl_divergence(Pn.clean.astype(np.float64), an.astype(np.float64)).mean())
            rate_c, rate_a = float((Pn.clean.argmax(1) == sig).mean()), float((an.argmax(1) == sig).mean())
            Pm = get_pass(mdl, "mc")
            acc_c = float(mc_correct(Pm.clean, answers).mean())
            acc_a = float(mc_correct(Pm.ablated(latents("mc", src, feat), contrib), answers).mean())
            task = abs(acc_a - acc_c) / acc_c if acc_c > 0 else abs(acc_a - acc_c)
            side = bool(task < st.side_budget and abs(rate_a - rate_c) < st.side_budget)
            illusion = cc["sd_d"] + max(0.0, st.d_min - cc["mean_d"]) if np.isfinite(cc["mean_d"]) else float("inf")
            score = ccis(effect, ident, sem, task, illusion, eps=st.ccis_eps)
            row.update({**{f"d_{m}": v for m, v in cc["d"].items()}, "mean_d": cc["mean_d"], "sd_d": cc["sd_d"],
                        "consistent": cc["consistent"], "neutral_kl": sem, "neutral_signature_clean": rate_c,
                        "neutral_signature_ablated": rate_a, "mc_acc_clean": acc_c, "mc_acc_ablated": acc_a,
                        "task_loss": task, "side_ok": side, "illusion": illusion, "ccis": score, "measured": True})
            for meth, d in cc["d"].items():
                cor_rows.append({"source": src, "feature": feat, "method": meth, "d": d})
        else:  # cannot pass the causal gate nor reach ccis_min: the costly measurements are skipped
            row.update({**{f"d_{m}": nan for m in inp.corrupted}, "mean_d": nan, "sd_d": nan, "consistent": False,
                        "neutral_kl": nan, "neutral_signature_clean": nan, "neutral_signature_ablated": nan,
                        "mc_acc_clean": nan, "mc_acc_ablated": nan, "task_loss": nan, "side_ok": False,
                        "illusion": nan, "ccis": nan, "measured": False})
        row["ccis_significant"] = bool(row["measured"] and row["ccis"] > st.ccis_min and p_val < st.alpha)
        say(f"{src}:{feat} effect {effect:.3f} kl {kl_mine:.4f} p {p_val:.4f} ccis "
            f"{row['ccis']:.2f} (upper {upper:.2f}) ({time.time() - t1:.1f}s)")
        return row, cor_rows

    for var, src, feat in cand:
        row, cor_rows = units(f"feature/{src}/{feat}", functools.partial(measure, var, src, feat))
        res.features.append(row)
        res.corruption_rows += cor_rows
    rows = res.features
    res.funnel["causal"] = sum(r["causal"] for r in rows)
    res.funnel["consistent"] = sum(r["causal"] and r["consistent"] for r in rows)
    res.funnel["side_effects"] = sum(r["causal"] and r["consistent"] and r["side_ok"] for r in rows)
    res.survivors = [r for r in rows if r["causal"] and r["consistent"] and r["side_ok"]]
    res.n_ccis = sum(r["ccis_significant"] for r in rows)
    res.n_ccis_survivors = sum(r["ccis_significant"] for r in res.survivors)
    for s, f in res.funnel_by_source.items():
        mine = [r for r in rows if r["source"] == s]
        f["causal"] = sum(r["causal"] for r in mine)
        f["consistent"] = sum(r["causal"] and r["consistent"] for r in mine)
        f["side_effects"] = sum(r["causal"] and r["consistent"] and r["side_ok"] for r in mine)
    res.seconds["model_gates"] = time.time() - t0


__all__ = ["FUNNEL", "GateInputs", "GateResults", "GateSettings", "Pass", "ablation", "best_matches", "ccis",
           "cheap_gates", "corruption_consistency", "distribution_variance", "feature_contribution",
           "percentile_rank", "permutation_p", "region_coverage", "relative_change", "run_gates", "site_acts",
           "top_share"]
