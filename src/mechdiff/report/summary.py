"""The report's opening summary: a few facts per stage, each a number linked to the figure or table it comes from.

A summary function takes the `Run` and returns `Fact`s (none when its stage's files are absent); the registry
(`mechdiff.report.registry`) binds each function to a stage and to the figure its numbers link to.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from mechdiff.analysis.onset import CKA_TOL, KL_TOL, cka_onset, kl_onset
from mechdiff.report.run import Run, metric, plot


@dataclass(frozen=True)
class Fact:
    """One summary fact: a label, the number (linked to its summary item's figure or table) and a short note."""

    label: str
    value: str
    note: str = ""


def _site(name: str):
    from mechdiff.model.sites import Site

    return Site.parse(name)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x: float | None, digits: int = 3) -> str:
    """A metric for reading; "undefined" where it is null (NaN in the stage, e.g. a constant site)."""
    if x is None:
        return "undefined"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}"


def _q(q: float) -> str:
    return "≈ 0" if q == 0 else f"= {_num(q, 2)}"  # metrics keep 6 decimals: 0 means below 5e-7


def change_location(run: Run) -> list[Fact]:
    """Where CKA(base, tuned) first departs from 1 and where it is lowest (last-token view)."""
    cka = (run.json(metric("divergence.json")) or {}).get("cka") or {}
    if not any(v.get("last") is not None for v in cka.values()):
        return []
    first, low = cka_onset(cka)
    if first is None:
        return [Fact("representations", "unchanged", f"every site has CKA > {1 - CKA_TOL:g}")]
    return [
        Fact("change starts at", f"L{_site(first).layer}",
             f"first layer with a site at CKA < {1 - CKA_TOL:g} ({first}: {cka[first]['last']:.4f})"),
        Fact("largest change at", low, f"lowest CKA, {cka[low]['last']:.4f}"),
    ]


def layer_patch_onset(run: Run) -> list[Fact]:
    """Where patching base activations into the tuned model starts to move its output, and where most."""
    lp = (run.json(metric("divergence.json")) or {}).get("layer_patch") or {}
    kl = lp.get("base_into_tuned") or {}
    if not kl:
        return []
    by_layer = sorted((_site(k).layer, v) for k, v in kl.items())
    top_layer, top = max(by_layer, key=lambda t: t[1])
    onset = kl_onset(kl)
    if onset is None:
        return [Fact("layer patch", "no effect", f"KL <= {KL_TOL:g} nats at every layer")]
    return [Fact("layer patch starts at", f"L{onset}",
                 f"first layer where patching base into tuned moves the output by > {KL_TOL:g} nats "
                 f"(largest: {_num(top)} nats at L{top_layer})")]


def output_divergence(run: Run) -> list[Fact]:
    """Next-token KL(tuned || base) over all prompts, and cultural over control."""
    kl = (run.json(metric("divergence.json")) or {}).get("kl") or {}
    if "all" not in kl:
        return []
    ratio = kl.get("cultural_over_control")
    note = f"cultural / control = {ratio:.2f}" if ratio is not None else ""
    return [Fact("next-token KL", f"{_num(kl['all'])} nats", note)]


def directions(run: Run) -> list[Fact]:
    """Per patched site, the fewest map directions whose mapped patch reaches the target KL drop."""
    patch = run.json(metric("patch.json")) or {}
    target = run.info.settings.get("patch.target_drop")
    goal = f"{target:g}% KL drop" if target is not None else "the target KL drop"
    facts = []
    for site, m in patch.items():
        if not isinstance(m, dict) or "min_k" not in m:
            continue
        full = m.get("kl_drop_full")
        tail = f"full rank closes {full:.0f}%" if full is not None else ""
        if m.get("k_saturated", -1) >= 0:
            tail += f"{'; ' if tail else ''}the drop saturates at k = {m['k_saturated']}"
        if m["min_k"] < 0:
            facts.append(Fact(site, "not reached", f"no rank reaches {goal}; {tail}"))
        else:
            facts.append(Fact(site, f"k = {m['min_k']}", f"fewest directions reaching {goal}; {tail}"))
    return facts


def map_fit(run: Run) -> list[Fact]:
    """Held-out R² of each site's base -> tuned map, against its shuffled-pairs baseline."""
    maps = run.json(metric("transport/*.json")) or {}
    return [Fact(site, f"R² {_num(m['r2_val'])}", f"held out; shuffled pairs {_num(m.get('r2_val_shuffled'), 2)}")
            for site, m in maps.items() if "r2_val" in m]


def sae_fit(run: Run) -> list[Fact]:
    """FVU and CE recovered of each SAE (a crosscoder's CE recovered on base / tuned)."""
    facts = []
    for name, m in (run.json(metric("sae.json")) or {}).items():
        if "fvu" not in m:
            continue
        ce = [f"{m[k]:.3f}" for k in ("ce_recovered", "ce_recovered_base", "ce_recovered_tuned") if m.get(k) is not None]
        note = f"CE recovered {' / '.join(ce)}" + (" (base / tuned)" if len(ce) == 2 else "") if ce else ""
        if "passed" in m:  # sae.validate's verdict
            verdict = "passes validation" if m["passed"] else f"fails validation ({m.get('failed') or '?'})"
            note = f"{note}; {verdict}" if note else verdict
        facts.append(Fact(name, f"FVU {_num(m['fvu'])}", note))
    return facts


def feature_types(run: Run) -> list[Fact]:
    """Type A / B / C counts per SAE and how many features separate cultural from control prompts."""
    facts = []
    for name, m in (run.json(metric("features.json")) or {}).items():
        types = " · ".join(f"{k[-1]} {m[k]}" for k in ("type_A", "type_B", "type_C") if k in m)
        n = m.get("n_cultural_features")
        cultural = f"{n} features differ on cultural vs control prompts" if n is not None else ""
        if types:
            facts.append(Fact(name, types, cultural))
        elif cultural:
            facts.append(Fact(name, f"{n} features", "differ on cultural vs control prompts"))
    return facts


def theme_enrichment(run: Run) -> list[Fact]:
    """Per layer and theme kind, how many themes hold significantly more delta-SAE features, and the strongest."""
    df = run.table(plot("enrichment.csv"))
    if df is None or df.empty:
        return []
    facts = []
    for (layer, by), part in df.groupby(["layer", "by"], sort=True):
        up = part[part["significant"].astype(bool) & (part["enrichment"] > 1)]
        note = ""
        stable = bool(part["stable"].astype(bool).all()) if "stable" in part.columns else True
        if len(up) and not stable:  # an unstable clustering's themes move with float noise: no theme finding
            note = "themes not stable (ARI across seeds / resamples below features.stable_ari): not a finding"
        elif len(up):
            best = up.loc[up["enrichment"].idxmax()]
            words = best.get("top_words")
            words = f" ({words})" if isinstance(words, str) and not pd.isna(words) else ""
            note = f"strongest: theme {best['theme']}, E = {best['enrichment']:.2f}, q {_q(best['q'])}{words}"
        elif not stable:
            note = "themes not stable"
        facts.append(Fact(f"L{layer} themes by {by}", f"{len(up)} of {len(part)} enriched", note))
    return facts


def behaviour(run: Run) -> list[Fact]:
    """Per marker and multiple-choice set: base and tuned means with the tuned - base difference."""
    facts = []
    for ds, metrics in (run.json(metric("behaviour.json")) or {}).items():
        if not isinstance(metrics, dict):
            continue
        for name, c in metrics.items():
            if name == "refusal_rate" or not isinstance(c, dict) or c.get("base", {}).get("mean") is None:
                continue
            if not (name.endswith("_rate") or name in ("accuracy", "answer_accuracy")):
                continue
            d = c["diff"]
            facts.append(Fact(f"{ds} {name}", f"{_num(c['base']['mean'])} -> {_num(c['tuned']['mean'])}",
                              f"base -> tuned; difference {_num(d['mean'])} [{_num(d['lo'])}, {_num(d['hi'])}]"))
    return facts


def steering(run: Run) -> list[Fact]:
    """Per configuration and operation: min k, and the reported handle's effect with its side effects."""
    facts = []
    for config, m in (run.json(metric("steer.json")) or {}).items():
        if not isinstance(m, dict) or "min_k" not in m.get("steer", {}):
            continue
        for op, verb in (("steer", "closes"), ("ablate", "removes")):
            r = m[op]
            mk = "not reached" if r["min_k"] is None else f"min k = {r['min_k']}"
            eff = r["effect"][0] if isinstance(r["effect"], list) else r["effect"]
            facts.append(Fact(f"{config} {op}", mk,
                              f"k = {r['k']}, alpha = {r['alpha']:g} {verb} {_num(eff)} of the behaviour gap; "
                              f"perplexity {r['ppl_change']:+.1%}, neutral accuracy {-r['mc_drop']:+.3f}"))
    return facts


def geometry(run: Run) -> list[Fact]:
    """Median hierarchical angle against its controls, separation, and the pair's most moved concepts."""
    m = run.json(metric("geometry.json")) or {}
    b = m.get("base")
    if not isinstance(b, dict) or b.get("median_child") is None:
        return []
    c = b["controls"]
    verdict = b.get("orthogonality") or {}
    mean = c.get("mean_estimator") or {}
    holds = ("" if "holds" not in verdict else
             f"orthogonality {'holds' if verdict['holds'] else 'does not hold'} "
             f"(plain means {_pct(mean.get('share_80_100'))} within 80-100 deg); ")
    facts = [Fact("parent vs child-delta angle (base)", f"{b['median_child']:.1f} deg",
                  f"{holds}{b['share_80_100']:.0%} within 80-100 deg; random parents "
                  f"{c['random_parents']['median_child']:.1f}, "
                  f"shuffled {c['shuffled']['median_child']:.1f}, Euclidean {c['euclidean']['median_child']:.1f}"),
             Fact("held-out words vs random tokens", f"AUC {_num(b['separation_auc'])}",
                  f"shuffled unembedding {_num(c['shuffled'].get('separation_auc'))}")]
    poly = b.get("polytope") or {}
    if poly.get("accuracy") is not None:
        facts.append(Fact("held-out child words at their own vertex (base)", f"{poly['accuracy']:.0%}",
                          f"chance {poly['chance']:.0%}, shuffled {_pct((c['shuffled'].get('polytope') or {}).get('accuracy'))}; "
                          f"median singular-value ratio {_num(poly['median_sv_ratio'])}"))
    kids = b.get("child_intervention") or {}
    if kids.get("children"):
        facts.append(Fact("sibling log-ratio change: parent vs child push (base)",
                          f"{_num(kids['median_ratio_parent'])} vs {_num(kids['median_ratio_child'])} nats",
                          f"own words rise most for {kids['share_own_top']:.0%} of child pushes"))
    pair = m.get("pair") or {}
    if pair.get("most_moved"):
        facts.append(Fact("most moved concepts", ", ".join(pair["most_moved"][:3]),
                          f"median context cosine base vs tuned {_num(pair['median_cos_context'])}; unembedding "
                          f"cosine >= {_num(pair['min_cos_unembedding'])}"))
    return facts


def hsae(run: Run) -> list[Fact]:
    """Teacher vs random H-SAE on the seed's targets, per model."""
    m = run.json(metric("hsae.json")) or {}
    facts = []
    for which in ("base", "tuned"):
        t = (m.get(which) or {}).get("targets")
        if not isinstance(t, dict):
            continue
        met = ", ".join(f"{k} {'met' if v else 'missed'}" for k, v in t["met"].items())
        facts.append(Fact(f"{which}: teacher vs random", f"purity {_num(t['purity_gain_pp'])} pp", met))
    return facts


def heads(run: Run) -> list[Fact]:
    """Churn, overlap, and how many heads close the target share of the gap."""
    m = run.json(metric("heads.json")) or {}
    if m.get("churn") is None:
        return []
    n = m.get("heads_for_target")
    rho = {"pred": "spearman_pred", "direct": "spearman_direct"}.get(m.get("rank_by"), "spearman_patch")
    total = m["n_layers"] * m["n_heads"]
    return [Fact("churn (|dz| above threshold)", f"{m['churn']:.1%}", f"{m['n_churn']} of {total} heads; top-"
                 f"{m['top_k']} overlap (Jaccard) {_num(m['jaccard_top_k'])}"),
            Fact(f"heads closing {m['target_effect']:.0%} of the gap", "not reached" if n is None else str(n),
                 f"all heads patched close {_num(m['share_all_heads'])}; Spearman of the ranking "
                 f"({m.get('rank_by', 'delta')}) vs measured patch "
                 f"{_num(m.get(rho))}")]


def gates(run: Run) -> list[Fact]:
    """The gate funnel (how many features pass each gate) and the CCIS count."""
    m = run.json(metric("gates.json")) or {}
    funnel = m.get("funnel") or {}
    if not funnel:
        return []
    steps = " -> ".join(f"{k} {v}" for k, v in funnel.items())
    st = m.get("settings") or {}
    return [Fact("features through every gate", str(m.get("n_survivors", list(funnel.values())[-1])), steps),
            Fact(f"CCIS > {st.get('ccis_min', 1.5)} at p < {st.get('alpha', 0.001)}", str(m.get("n_ccis_significant")),
                 "features reaching the seed's causal cultural impact bar")]


def probes(run: Run) -> list[Fact]:
    """Per probe task: the test score at each model's best layer (chosen by CV), base -> tuned."""
    facts = []
    for task, t in ((run.json(metric("probes.json")) or {}).get("tasks") or {}).items():
        b, tu = t.get("base") or {}, t.get("tuned") or {}
        if b.get("test") is None or tu.get("test") is None:
            continue
        facts.append(Fact(f"{task} ({t.get('metric', 'score')})", f"{_num(b['test'])} -> {_num(tu['test'])}",
                          f"base L{b.get('best_layer')} -> tuned L{tu.get('best_layer')} (best by CV)"
                          + (f"; chance {_num(t['chance'])}" if t.get("chance") is not None else "")))
    return facts
