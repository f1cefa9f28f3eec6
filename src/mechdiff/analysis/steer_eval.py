"""Steering and ablation sweeps: effect on the target behaviour and side effects on neutral prompts.

One `Arm` is a model with everything needed to score interventions on it: its encoded target prompts (dev and
test), the goal model's decision-token logits and behaviour on the same prompts, and the neutral side-effect
sets. Steering is the arm of the base model (goal: the tuned model); ablation is the arm of the tuned model
(goal: the base model). `evaluate` scores one intervention on an arm; `sweep` runs a (k, alpha) grid of
handles and `summarise` picks alpha on dev, min k on test and the reported k. Definitions: docs/ALGORITHMS.md
(steering and ablation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from mechdiff.analysis.behaviour import (
    Intervene,
    PrefixCache,
    continuation_logprobs,
    decision_logits,
    generated_answers,
    greedy_continuations,
    marker_hits,
    mc_correct,
    option_logprobs,
    perplexity,
)
from mechdiff.analysis.similarity import next_token_kl
from mechdiff.analysis.steering import (
    Handle,
    choose_alpha,
    delta_directions,
    dim_directions,
    fit_gate,
    fit_handle,
    forward_key,
    gap_closed,
    intervention,
    mean_ablation_handle,
    min_k_within,
    sae_directions,
    transport_directions,
)
from mechdiff.errors import MechdiffError
from mechdiff.model.sites import Site
from mechdiff.model.tokens import Encoded
from mechdiff.resume import UnitsFn, compute_all
from mechdiff.stats.bootstrap import drop_pct, rows_ci


@dataclass
class Neutral:
    """Side-effect sets: neutral prompts (decision-token KL), the model's own greedy continuations of them
    (perplexity) and neutral multiple-choice questions (accuracy)."""

    rows: np.ndarray
    prompts: list[str]
    continuations: list[str]
    mc_questions: list[str]
    mc_choices: list[list[str]]
    mc_answers: list[int]
    # unintervened reference values, filled by `Arm.prepare`
    logits: np.ndarray | None = None
    ppl: float = float("nan")
    mc_acc: float = float("nan")


@dataclass
class Arm:
    """A model whose behaviour an intervention moves toward a goal model (steer: base -> tuned; ablate: tuned -> base)."""

    name: str
    model: nn.Module
    tokenizer: Any
    enc: Encoded
    rows: dict[str, np.ndarray]  # split -> target rows (dev, test)
    goal_logits: dict[str, np.ndarray]  # split -> goal model's decision logits on those rows
    goal_hits: dict[str, np.ndarray]  # split -> goal model's marker hits
    neutral: dict[str, Neutral]  # split (dev, test) -> side-effect sets
    patterns: Sequence[str]
    answers: Sequence[str] | None = None  # per corpus row: its reference answer; set = the behaviour is accuracy
    allowed_self: np.ndarray | None = None
    allowed_goal: np.ndarray | None = None
    chat: bool = True
    max_len: int = 128
    max_new_tokens: int = 4
    batch_size: int = 16
    from_first: bool = False  # the intervention acts on every prompt token, not from the decision token on
    prefix: PrefixCache | None = None  # unintervened prompt prefixes, shared by every intervention (decision on)
    own_logits: dict[str, np.ndarray] = field(default_factory=dict)
    own_hits: dict[str, np.ndarray] = field(default_factory=dict)
    own_kl: dict[str, np.ndarray] = field(default_factory=dict)  # split -> KL(goal || unintervened) (kl_before)

    def prepare(self) -> Arm:
        """Score the unintervened model once (the reference of every effect and side effect)."""
        if not self.from_first:
            self.prefix = PrefixCache(self.model)
        for split, rows in self.rows.items():
            self.own_hits[split], self.own_logits[split] = self._hits(rows, None)
        for split, n in self.neutral.items():
            n.logits = decision_logits(self.model, self.enc, n.rows, batch_size=self.batch_size, prefix=self.prefix)
            s, t = continuation_logprobs(self.model, self.tokenizer, n.prompts, n.continuations, chat=self.chat,
                                         max_len=self.max_len + 32, batch_size=self.batch_size, prefix=self.prefix)
            n.ppl = perplexity(s, t)
            n.mc_acc = float(self._mc(split, None).mean())
        return self

    def _hits(self, rows: np.ndarray, intervene: Intervene | None) -> tuple[np.ndarray, np.ndarray]:
        """Marker hits of greedy continuations and the decision-token logits of the same pass."""
        V = self.model.get_output_embeddings().weight.shape[0]
        logits = np.empty((len(rows), V), dtype=np.float32)
        kw = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size, "intervene": intervene,
              "prefix": self.prefix, "logits_out": logits}
        if self.answers is not None:
            right = generated_answers(self.model, self.tokenizer, self.enc, rows,
                                      [self.answers[int(r)] for r in rows], **kw)
            return right.astype(np.float64), logits
        texts = greedy_continuations(self.model, self.tokenizer, self.enc, rows, **kw)
        return marker_hits(texts, list(self.patterns)).astype(np.float64), logits

    def _mc(self, split: str, intervene: Intervene | None) -> np.ndarray:
        n = self.neutral[split]
        lp = option_logprobs(self.model, self.tokenizer, n.mc_questions, n.mc_choices, chat=self.chat,
                             max_len=self.max_len + 64, batch_size=self.batch_size, intervene=intervene,
                             prefix=self.prefix)
        return mc_correct(lp, n.mc_answers).astype(np.float64)

    def kl_to_goal(self, split: str, logits: np.ndarray) -> np.ndarray:
        """Per-prompt KL(goal || logits) on the split's target rows (fairness-aligned ids when tokenizers differ)."""
        return next_token_kl(self.goal_logits[split], logits, self.allowed_goal, self.allowed_self)

    def kl_before(self, split: str) -> np.ndarray:
        """Per-prompt KL(goal || unintervened model) on the split's target rows, computed once per goal."""
        if split not in self.own_kl:
            self.own_kl[split] = self.kl_to_goal(split, self.own_logits[split])
        return self.own_kl[split]


def gap_share(own: np.ndarray, goal: np.ndarray, new: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Share of the own -> goal gap in mean behaviour that the intervention closes: (new - own) / (goal - own)."""
    if idx is not None:
        own, goal, new = own[idx], goal[idx], new[idx]
    return gap_closed(float(own.mean()), float(goal.mean()), float(new.mean()))


def kl_share(kl_before: np.ndarray, kl_after: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Share of the KL to the goal model that the intervention removes: 1 - mean KL after / mean KL before
    (`stats.bootstrap.drop_pct` / 100: undefined below its noise floor)."""
    if idx is not None:
        kl_before, kl_after = kl_before[idx], kl_after[idx]
    return drop_pct(float(kl_before.mean()), float(kl_after.mean())) / 100.0


def _ci(stat: Callable[[np.ndarray], float], n: int, n_boot: int, seed: int) -> list[float]:
    value = stat(np.arange(n))
    if n < 2 or not np.isfinite(value):
        return [value, float("nan"), float("nan")]
    lo, hi = rows_ci(stat, n, n_boot=n_boot, seed=seed)
    return [value, lo, hi]


def evaluate(arm: Arm, intervene: Intervene, *, splits: Sequence[str] = ("dev", "test"), side: str | None = "dev",
             n_boot: int = 0, seed: int = 0) -> dict[str, Any]:
    """Effect of one intervention on the arm's target splits, and its side effects on the `side` split's neutral
    sets (None: none).

    effect_<split>: share of the behaviour gap closed; kl_<split>: share of the KL to the goal removed.
    ppl_change: relative change of the perplexity of the model's own neutral continuations; mc_drop: neutral
    multiple-choice accuracy lost (absolute); kl_neutral: mean KL(unintervened || intervened) on neutral prompts.
    With n_boot > 0 the test effects carry [value, lo, hi] bootstrap CIs over prompts.
    """
    out: dict[str, Any] = {}
    if arm.from_first:
        intervene = from_first(intervene)
    for split in splits:
        rows = arm.rows[split]
        hits, logits = arm._hits(rows, intervene)
        before, after = arm.kl_before(split), arm.kl_to_goal(split, logits)
        own, goal = arm.own_hits[split], arm.goal_hits[split]
        out[f"rate_{split}"] = float(hits.mean())
        if n_boot and split == "test":
            def eff(i, o=own, g=goal, h=hits):
                return gap_share(o, g, h, i)

            def kls(i, b=before, a=after):
                return kl_share(b, a, i)

            out[f"effect_{split}"] = _ci(eff, len(rows), n_boot, seed)
            out[f"kl_{split}"] = _ci(kls, len(rows), n_boot, seed)
        else:
            out[f"effect_{split}"] = gap_share(own, goal, hits)
            out[f"kl_{split}"] = kl_share(before, after)
        out[f"hits_{split}"] = hits
    if side is not None:
        n = arm.neutral[side]
        lg = decision_logits(arm.model, arm.enc, n.rows, batch_size=arm.batch_size, intervene=intervene,
                             prefix=arm.prefix)
        out["kl_neutral"] = float(next_token_kl(n.logits, lg).mean())
        s, t = continuation_logprobs(arm.model, arm.tokenizer, n.prompts, n.continuations, chat=arm.chat,
                                     max_len=arm.max_len + 32, batch_size=arm.batch_size, intervene=intervene,
                                     prefix=arm.prefix)
        out["ppl_change"] = float(perplexity(s, t) / n.ppl - 1.0)
        out["mc_drop"] = float(n.mc_acc - arm._mc(side, intervene).mean())
    return out


def within_budget(res: dict[str, Any], *, ppl_budget: float, mc_budget: float) -> bool:
    """True when the side effects stay inside the budget (perplexity change and neutral accuracy drop)."""
    return bool(res["ppl_change"] <= ppl_budget and res["mc_drop"] <= mc_budget)


def site_group(name: str, layers: Sequence[int]) -> list[Site]:
    """The sites of one steering configuration: one site by name, or "layers" = attn_out and mlp_out of every
    layer in `layers` (each block's own writes into the residual stream, so per-layer changes add up)."""
    if name == "layers":
        if not layers:
            raise MechdiffError("steer.layers is empty: list the layers the 'layers' configuration intervenes at")
        return [Site(int(layer), kind) for layer in layers for kind in ("attn_out", "mlp_out")]
    return [Site.parse(name)]


def sweep(arms: dict[str, Arm], handles_for: Callable[[int], dict[str, list[Handle]]], ks: Sequence[int],
          alphas: Sequence[float], *, ppl_budget: float, mc_budget: float, progress: bool = False,
          units: UnitsFn = compute_all) -> list[dict[str, Any]]:
    """Every (operation, k, alpha): dev and test effect, KL share and the side effects; one row each. `units`
    (`resume.Units`) keeps each row as it finishes, so an interrupted sweep resumes; the handles of a k are fitted
    only when one of its rows is still to compute."""
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(ks) * len(alphas) * len(arms), desc="steer sweep", leave=False, disable=not progress)
    for k in ks:
        fitted: dict[str, list[Handle]] = {}

        def row(op: str, arm: Arm, a: float, k: int = int(k), fitted=fitted) -> dict[str, Any]:
            if not fitted:
                fitted.update(handles_for(k))
            res = evaluate(arm, intervention(fitted[op], a))
            return {"op": op, "k": k, "alpha": a, **{key: v for key, v in res.items() if not key.startswith("hits_")},
                    "within_budget": within_budget(res, ppl_budget=ppl_budget, mc_budget=mc_budget)}

        for op, arm in arms.items():
            for a in alphas:
                rows.append(units(f"sweep/{op}/k{int(k)}/alpha{float(a)!r}",
                                  lambda op=op, arm=arm, a=float(a), row=row: row(op, arm, a)))
                bar.update(1)
    bar.close()
    return rows


def choose(rows: list[dict[str, Any]], op: str, *, target: float, k: int | str = "auto"
           ) -> tuple[list[dict[str, Any]], int | None, int]:
    """Per k of one operation: alpha chosen on dev (dev effect within budget closest to 1); min k = the smallest k
    whose test effect at its alpha reaches `target` within budget; the reported k = `k`, or min k when "auto"
    (the largest k when no k reaches the target). Returns (the chosen row per k, min k, reported k)."""
    mine = [r for r in rows if r["op"] == op]
    if not mine:
        raise MechdiffError(f"no sweep results for operation {op!r}")
    best = []
    for kk in sorted({r["k"] for r in mine}):
        rk = [r for r in mine if r["k"] == kk]
        a = choose_alpha([r["alpha"] for r in rk], [r["effect_dev"] for r in rk], [r["within_budget"] for r in rk])
        best.append(dict(next(r for r in rk if r["alpha"] == a)))
    ks = [r["k"] for r in best]
    mk = min_k_within(ks, [r["effect_test"] for r in best], [r["within_budget"] for r in best], target)
    if k == "auto":
        chosen = mk if mk is not None else max(ks)
    else:
        if int(k) not in ks:
            raise MechdiffError(f"steer.k = {k} is not in steer.k_sweep {ks}: add it to the sweep or use auto")
        chosen = int(k)
    return best, mk, chosen


def from_first(intervene: Intervene) -> Intervene:
    """The same intervention acting on every token of the prompt (start = 0) instead of from the decision token."""
    import torch

    def wrapped(model: nn.Module, start: torch.Tensor):
        return intervene(model, torch.zeros_like(start))

    wrapped.first_block = getattr(intervene, "first_block", 0)
    return wrapped


def correct_split(model: nn.Module, tokenizer: Any, enc: Encoded, rows: np.ndarray, references: Sequence[str], *,
                  max_new_tokens: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(the rows the model answers correctly, the rows it answers wrongly), by whether its greedy continuation
    gives each row's reference answer (`answer_hits`; `references` one per row): the two classes of seed 002's
    projector for a cognitive (math) change, correct vs incorrect."""
    rows = np.asarray(rows, dtype=np.int64)
    ok = generated_answers(model, tokenizer, enc, rows, references, max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
    return rows[ok], rows[~ok]


def make_arms(models: dict[str, tuple[nn.Module, Any]], encs: dict[str, Encoded], rows: dict[str, np.ndarray],
              neutral_texts: dict[str, Sequence[str]],
              neutral_mc: dict[str, tuple[list[str], list[list[str]], list[int]]], patterns: Sequence[str], *,
              allowed: dict[str, np.ndarray | None], chat: bool, max_len: int, max_new_tokens: int, batch_size: int,
              from_token: str = "decision", neutral_tokens: int = 8, answers: Sequence[str] | None = None,
              units: UnitsFn = compute_all) -> dict[str, Arm]:
    """The steer arm (base, goal tuned) and the ablate arm (tuned, goal base), scored once without intervention.

    `rows` holds the target rows "dev" and "test" and the neutral rows "neutral_dev" and "neutral_test";
    `neutral_texts` and `neutral_mc` the neutral prompts' texts and the multiple-choice sets of each split.
    `answers` (one reference answer per corpus row, or None): the behaviour is the accuracy of the greedy answers
    (`answer_hits`) instead of the marker rate of `patterns`.
    `units` (`resume.Units`) keeps each model's unintervened scores (a resumed arm fills its prefix cache as the
    interventions ask for it)."""
    arms: dict[str, Arm] = {}
    own: dict[str, dict] = {}
    for which in ("base", "tuned"):
        model, tok = models[which]
        enc = encs[which]

        def arm_with(neutral: dict[str, Neutral], which: str = which, model: nn.Module = model, tok: Any = tok,
                     enc: Encoded = enc) -> Arm:
            return Arm(which, model, tok, enc, {"dev": rows["dev"], "test": rows["test"]}, {}, {}, neutral,
                       list(patterns), allowed_self=allowed[which], allowed_goal=None, chat=chat, max_len=max_len,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, from_first=from_token == "first",
                       answers=answers)

        made: dict[str, Arm] = {}

        def scored(which: str = which, model: nn.Module = model, tok: Any = tok, enc: Encoded = enc,
                   arm_with=arm_with, made=made) -> tuple[dict[str, Neutral], dict, dict]:
            neutral = {}
            for split in ("dev", "test"):
                nrows = rows[f"neutral_{split}"]
                texts = greedy_continuations(model, tok, enc, nrows, max_new_tokens=neutral_tokens,
                                             batch_size=batch_size)
                keep = [i for i, t in enumerate(texts) if t.strip()]
                if not keep:
                    raise MechdiffError(f"the {which} model's continuations of every neutral {split} prompt are "
                                        "empty: side effects cannot be measured")
                q, c, a = neutral_mc[split]
                neutral[split] = Neutral(rows=nrows, prompts=[neutral_texts[split][i] for i in keep],
                                         continuations=[texts[i] for i in keep], mc_questions=q, mc_choices=c,
                                         mc_answers=a)
            made["arm"] = arm = arm_with(neutral).prepare()
            return neutral, arm.own_hits, arm.own_logits

        neutral, own_hits, own_logits = units(f"arm/{which}", scored)
        arm = made.get("arm")
        if arm is None:  # resumed: the scores were kept, the prefix cache fills again on use
            arm = arm_with(neutral)
            arm.own_hits, arm.own_logits = own_hits, own_logits
            if not arm.from_first:
                arm.prefix = PrefixCache(model)
        arms[which] = arm
        own[which] = {"logits": arm.own_logits, "hits": arm.own_hits}
    for which, goal in (("base", "tuned"), ("tuned", "base")):
        arms[which].goal_logits = own[goal]["logits"]
        arms[which].goal_hits = own[goal]["hits"]
        arms[which].allowed_goal = allowed[goal]
        arms[which].own_kl = {}
    return {"steer": arms["base"], "ablate": arms["tuned"]}


def directions_for(source: str, k: int, site: Site, delta: np.ndarray, *, n_target: int, groups: Sequence[str],
                   extra: dict[str, Any] | None = None) -> np.ndarray:
    """(d, k) directions at `site` from `source`, fitted on train rows only: `delta` = tuned - base decision-token
    activations, its first `n_target` rows the target prompts (with `groups`) and the rest control prompts.

    dim: difference in means of the change (target - control), rank k from the class-conditional differences;
    delta: top-k singular directions of the target prompts' change; transport: the site's map's top-k change
    directions (`extra["maps"][site]`); sae: decoder directions of the k delta-SAE latents whose mean code on the
    target prompts' change most exceeds the control prompts' (`extra["saes"][site]`).
    """
    tgt, ctl = delta[:n_target], delta[n_target:]
    if source == "dim":
        return dim_directions(tgt, np.asarray(groups), ctl, k)
    if source == "delta":
        return delta_directions(tgt, k)
    extra = extra or {}
    if source == "transport":
        m = extra.get("maps", {}).get(site.name)
        if m is None:
            raise MechdiffError(f"steer.source transport needs a transport map at {site.name}: add it to transport.sites")
        return transport_directions(m, k)
    if source == "sae":
        import torch

        sae = extra.get("saes", {}).get(site.name)
        if sae is None:
            raise MechdiffError(f"steer.source sae needs a delta SAE at {site.name}: add layer {site.layer} to "
                                "sae.layers (resid_post) and 'delta' to sae.sources")
        with torch.no_grad():
            z_t = sae.encode(torch.as_tensor(tgt, dtype=torch.float32)).double().mean(0).numpy()
            z_c = sae.encode(torch.as_tensor(ctl, dtype=torch.float32)).double().mean(0).numpy()
        return sae_directions(sae.W_dec.detach().double().numpy().T, z_t - z_c, k)  # W_dec is (d, latents)
    raise MechdiffError(f"steer.source {source!r}: choose dim, delta, transport or sae")


ABLATIONS = ("fitted", "mean")  # how the ablate handles are made: `fit_handle` tuned -> base, or `mean_ablation_handle`


# (model "base" | "tuned", handles acting upstream, site) -> that model's decision-token activations at the site
# (fitting rows, in order) with the handles applied: what `group_handles` fits a downstream handle on
Refit = Callable[[str, list[Handle], Site], np.ndarray]


def group_handles(group: Sequence[Site], acts_base: dict[str, np.ndarray], acts_tuned: dict[str, np.ndarray], k: int,
                  *, source: str, n_target: int, groups: Sequence[str], extra: dict[str, Any] | None = None,
                  affine: bool = True, ablation: str = "fitted", refit: Refit | None = None
                  ) -> dict[str, list[Handle]]:
    """The steer and ablate handles of one configuration at rank k: per site of `group`, directions from `source`
    (`directions_for`) on the change tuned - base of the fitting rows (`acts_*[site.name]`, target rows first), a
    steer handle fitted base -> tuned and an ablate handle (`ablation`: fitted tuned -> base, or the directional
    ablation to the base mean). A site where the two models' activations are identical on every fitting row (a
    layer before the change, or a site the change bypasses, e.g. a parallel-residual MLP) gets no handle: there
    is nothing to steer there. {"steer": [...], "ablate": [...]}; an error when no site of the group changed.

    With several sites, a site downstream of another's handle already sees part of the change through it (an
    MLP reads its block's steered attention output), so fitting every handle on the unintervened activations
    would count that part twice. With `refit`, the sites are taken in forward order and each later one is
    fitted on its model's activations with the earlier handles applied (`refit(model, handles, site)`): the
    steer handle on the steered base against the tuned model, the ablate handle on the ablated tuned model
    against the base. Without it (one site, or a caller that cannot run the models), every site is fitted on
    the unintervened activations."""
    if ablation not in ABLATIONS:
        raise MechdiffError(f"steer.ablation {ablation!r}: choose {' or '.join(ABLATIONS)}")
    out: dict[str, list[Handle]] = {"steer": [], "ablate": []}
    for site in sorted(group, key=forward_key):
        Xb, Xt = acts_base[site.name], acts_tuned[site.name]
        if np.array_equal(Xb, Xt):
            continue
        fb, ft = Xb, Xt  # the steer handle maps fb -> Xt, the ablate handle ft -> Xb
        if refit is not None and out["steer"]:
            fb = refit("base", out["steer"], site)
            if ablation == "fitted":  # a mean ablation reads only the base activations
                ft = refit("tuned", out["ablate"], site)
        V = directions_for(source, k, site, Xt - fb, n_target=n_target, groups=groups, extra=extra)
        out["steer"].append(fit_handle(site, V, fb, Xt, affine=affine))
        if ablation == "fitted":
            Va = V if ft is Xt else directions_for(source, k, site, ft - Xb, n_target=n_target, groups=groups,
                                                   extra=extra)
            out["ablate"].append(fit_handle(site, Va, ft, Xb, affine=affine))
        else:
            out["ablate"].append(mean_ablation_handle(site, V, Xb))
    if not out["steer"]:
        raise MechdiffError(f"the tuned model equals the base at every site of {', '.join(s.name for s in group)} on "
                            "the fitting prompts: nothing to steer there; choose sites after the change (steer.sites, "
                            "steer.layers)")
    return out


def summarise(rows: list[dict[str, Any]], arms: dict[str, Arm], handles_for: Callable[[int], dict[str, list[Handle]]],
              *, target: float, k: int | str, n_boot: int, seed: int, ppl_budget: float, mc_budget: float
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per operation: alpha per k (dev effect within the dev side-effect budget); then, at those alphas, the
    side effects on the test neutral sets, min k (test effect within the test budget) and the reported k's
    test numbers with bootstrap CIs."""
    summary: dict[str, Any] = {}
    best_all: list[dict[str, Any]] = []
    for op, arm in arms.items():
        best, _, _ = choose(rows, op, target=target, k=k)
        for r in best:  # the chosen alpha of every k: its side effects on the test neutral sets
            side = evaluate(arm, intervention(handles_for(r["k"])[op], r["alpha"]), splits=(), side="test")
            r.update({key: side[key] for key in ("ppl_change", "mc_drop", "kl_neutral")},
                     within_budget=within_budget(side, ppl_budget=ppl_budget, mc_budget=mc_budget))
        ks = [r["k"] for r in best]
        mk = min_k_within(ks, [r["effect_test"] for r in best], [r["within_budget"] for r in best], target)
        chosen = (mk if mk is not None else max(ks)) if k == "auto" else int(k)
        row = next(r for r in best if r["k"] == chosen)
        res = evaluate(arm, intervention(handles_for(chosen)[op], row["alpha"]), splits=("test",), side=None,
                       n_boot=n_boot, seed=seed)
        summary[op] = {
            "min_k": mk, "k": chosen, "alpha": row["alpha"], "effect": res["effect_test"], "kl_share": res["kl_test"],
            "rate": res["rate_test"], "ppl_change": row["ppl_change"], "mc_drop": row["mc_drop"],
            "kl_neutral": row["kl_neutral"], "within_budget": row["within_budget"],
            "alpha_by_k": {str(r["k"]): r["alpha"] for r in best},
        }
        best_all += best
    return summary, best_all


def conditional(arm: Arm, handles: list[Handle], alpha: float, gate_site: Site, X_pos: np.ndarray, X_neg: np.ndarray,
                *, seed: int = 0) -> dict[str, Any]:
    """Steering gated by a linear probe on the decision-token activation at `gate_site` (fitted on train target vs
    control prompts): effect and side effects with and without the gate."""
    if arm.from_first:
        return {"gate_site": gate_site.name, "skipped": "the gate decides at the decision token; steer.from_token "
                "is 'first' (the intervention starts before the gate has seen the prompt)"}
    gate = fit_gate(gate_site, X_pos, X_neg, seed=seed)
    plain = evaluate(arm, intervention(handles, alpha), splits=("test",), side="test")
    gated = evaluate(arm, intervention(handles, alpha, gate=gate), splits=("test",), side="test")
    keys = ("effect_test", "kl_test", "ppl_change", "mc_drop", "kl_neutral")
    return {"gate_site": gate_site.name, "gate_train_accuracy": gate.train_accuracy,
            "ungated": {k.replace("_test", ""): plain[k] for k in keys},
            "gated": {k.replace("_test", ""): gated[k] for k in keys}}


def robustness(arms: dict[str, Arm], handles_for: Callable[[int], dict[str, list[Handle]]], summary: dict[str, Any],
               *, forms: Sequence[str]) -> dict[str, Any]:
    """The reported handle's effect per template family (form) of the target test prompts."""
    forms_a = np.asarray(forms)
    out: dict[str, Any] = {}
    for op, arm in arms.items():
        m = summary[op]
        res = evaluate(arm, intervention(handles_for(m["k"])[op], m["alpha"]), splits=("test",), side=None)
        hits = res["hits_test"]
        out[op] = {f: {"n": int((forms_a == f).sum()),
                       "effect": gap_share(arm.own_hits["test"], arm.goal_hits["test"], hits,
                                           np.flatnonzero(forms_a == f))}
                   for f in sorted(set(forms))}
    same = arms["steer"].allowed_self is None
    out["fairness"] = ("no-op: identical tokenizers, masking changes nothing" if same else
                       "KL measured on the shared vocabulary (masking on); off is undefined across vocabularies")
    return out


def report_rows(grid: list[dict[str, Any]], best: list[dict[str, Any]], metrics: dict[str, Any]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(effect and side effects vs k at each k's alpha, effect vs alpha at the reported k), one series per
    configuration and operation."""
    cols = ("effect_dev", "effect_test", "kl_test", "ppl_change", "mc_drop", "kl_neutral", "within_budget")
    k_rows = [{"series": f"{r['config']} {r['op']}", "config": r["config"], "op": r["op"], "k": r["k"],
               "alpha": r["alpha"], **{c: r[c] for c in cols}} for r in best]
    alpha_rows = [{"series": f"{r['config']} {r['op']}", "config": r["config"], "op": r["op"], "k": r["k"],
                   "alpha": r["alpha"], **{c: r[c] for c in cols}}
                  for r in grid if r["k"] == metrics[r["config"]][r["op"]]["k"]]
    return k_rows, alpha_rows


__all__ = ["ABLATIONS", "Arm", "Neutral", "Refit", "choose", "conditional", "correct_split", "directions_for",
           "from_first", "group_handles", "make_arms", "report_rows",
           "robustness", "summarise", "evaluate", "gap_share", "kl_share", "site_group", "sweep",
           "within_budget"]
