"""Stage steer: steer the base toward the tuned model and ablate the change in the tuned model along k directions,
sweeping k and alpha; effect on the target behaviour, side effects on neutral prompts, conditional steering."""

import functools
import time

import numpy as np

import mechdiff.pipeline as P
from mechdiff.analysis.steer_eval import (
    conditional,
    correct_split,
    from_first,
    group_handles,
    make_arms,
    report_rows,
    robustness,
    site_group,
    summarise,
    sweep,
)
from mechdiff.analysis.steering import collect_decision_acts, intervention
from mechdiff.data.corpus import has_reference, load_prompts, prompt_form
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.fast import pack_for_inference
from mechdiff.model.load import load_saved
from mechdiff.model.sites import Site
from mechdiff.params import load_params
from mechdiff.pipeline import allowed_ids, encode_prompts, eval_sets, kept_prompts, pick_rows


def direction_inputs(source: str, sites: list[Site]) -> dict:
    """What a direction source reads besides activations: the transport maps ("transport") or the delta SAEs
    ("sae") at the sites that have one; nothing for "dim" and "delta"."""
    if source == "transport":
        from mechdiff.analysis.transport import load_map

        return {"maps": {x.name: load_map(P.map_dir(x.name)) for x in sites if P.map_dir(x.name).exists()}}
    if source == "sae":
        from mechdiff.sae.model import load_sae

        return {"saes": {x.name: load_sae(P.sae_dir("delta", x.layer)) for x in sites
                         if x.kind == "resid_post" and P.sae_dir("delta", x.layer).exists()}}
    return {}


def main() -> None:
    p = load_params()
    s = p.steer
    t0 = time.time()
    prompts = kept_prompts()
    evals = load_prompts(P.EVAL_PROMPTS)
    mc = {}
    for split, name in (("dev", "val"), ("test", "test")):
        sets, _ = eval_sets(evals, split=name, n=s.mc_questions, seed=p.seed)
        if s.neutral_mc not in sets:
            raise MechdiffError(f"steer.neutral_mc {s.neutral_mc!r} has no multiple-choice {name} records "
                                f"(scored sets: {', '.join(sets) or 'none'}): check data.eval_sources")
        mc[split] = sets[s.neutral_mc]
    answers, has_ref = None, np.array([has_reference(q) for q in prompts])
    if s.measure == "accuracy" or s.contrast == "correct":  # both read the target prompts' reference answers
        answers = [q.reference for q in prompts]
        if not has_ref[pick_rows(prompts, datasets=(s.target,))].any():
            raise MechdiffError(f"steer.measure accuracy / steer.contrast correct need reference answers, and the "
                                f"{s.target} prompts have none: set steer.target to a dataset with references (math)")
    rows = {
        "train_target": pick_rows(prompts, split="train", datasets=(s.target,), n=4 * s.max_prompts, seed=p.seed),
        "train_control": pick_rows(prompts, split="train", datasets=tuple(s.controls), n=4 * s.max_prompts,
                                   seed=p.seed),
        "dev": pick_rows(prompts, split="val", datasets=(s.target,), n=s.max_prompts, seed=p.seed),
        "test": pick_rows(prompts, split="test", datasets=(s.target,), n=s.max_prompts, seed=p.seed),
        "neutral_dev": pick_rows(prompts, split="val", datasets=(s.neutral,), n=s.max_prompts, seed=p.seed),
        "neutral_test": pick_rows(prompts, split="test", datasets=(s.neutral,), n=s.max_prompts, seed=p.seed),
    }
    if s.measure == "accuracy":  # accuracy is scored on the prompts that have a reference answer
        for split in ("dev", "test"):
            rows[split] = rows[split][has_ref[rows[split]]]
            if len(rows[split]) == 0:
                raise MechdiffError(f"steer.measure accuracy: no {s.target} {split} prompt has a reference answer")

    def check_groups() -> None:
        which = " the tuned model answers correctly" if s.contrast == "correct" else ""
        wrong = s.groups_problem(len({prompts[i].group for i in rows["train_target"]}), which=which)
        if wrong:
            raise MechdiffError(wrong)

    if s.contrast == "controls":
        check_groups()  # before the models load
    groups = {name: site_group(name, s.layers) for name in s.sites}
    sites = sorted({x for g in groups.values() for x in g} | {Site(g[0].layer, "resid_pre") for g in groups.values()})
    units = P.stage_units("steer")  # an interrupted run resumes the finished activations, scores, cells, summaries
    models, encs, acts = {}, {}, {}
    for which in ("base", "tuned"):
        models[which] = load_saved(P.model_dir(which), device=p.steer.device, dtype=p.pair.dtype)
        pack_for_inference(models[which][0])
        encs[which] = encode_prompts(models[which][1], prompts, chat=p.data.chat, max_len=p.data.max_len)
    gate_rows = None
    if s.contrast == "correct":  # seed 002's math projector: target prompts the tuned model answers right vs wrong
        pool = pick_rows(prompts, split="train", datasets=(s.target,), n=8 * s.max_prompts, seed=p.seed)
        pool = pool[has_ref[pool]]
        right, wrong = units("correct", lambda: correct_split(
            *models["tuned"], encs["tuned"], pool, [answers[i] for i in pool], max_new_tokens=s.max_new_tokens,
            batch_size=s.batch_size))
        if min(len(right), len(wrong)) < 2:
            raise MechdiffError(f"steer.contrast correct: the tuned model answers {len(right)} of {len(pool)} "
                                f"{s.target} train prompts correctly in {s.max_new_tokens} tokens; both classes need "
                                "at least 2: raise steer.max_new_tokens or steer.max_prompts")
        gate_rows = (rows["train_target"], rows["train_control"])  # the gate still tells target from controls
        rows["train_target"], rows["train_control"] = right, wrong
        check_groups()
    target_groups = [prompts[i].group for i in rows["train_target"]]
    fit_rows = np.concatenate([rows["train_target"], rows["train_control"]])
    for which in ("base", "tuned"):
        acts[which] = units(f"acts/{which}", lambda which=which: collect_decision_acts(
            models[which][0], encs[which], fit_rows, sites, batch_size=s.batch_size))
    neutral_texts = {split: [prompts[i].text for i in rows[f"neutral_{split}"]] for split in ("dev", "test")}
    arms = make_arms(models, encs, rows, neutral_texts, mc, [p.behaviour.markers[s.marker]],
                     allowed=dict(zip(("base", "tuned"), allowed_ids())), chat=p.data.chat, max_len=p.data.max_len,
                     max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, from_token=s.from_token,
                     answers=answers if s.measure == "accuracy" else None, units=units)
    n_t = len(rows["train_target"])
    gate_acts, n_gate = acts["base"], n_t  # the conditional gate's fitting rows: target prompts vs controls
    if gate_rows is not None:
        gate_sites = sorted({Site(g[0].layer, "resid_pre") for g in groups.values()})
        gate_acts = units("acts/gate", lambda: collect_decision_acts(
            models["base"][0], encs["base"], np.concatenate(gate_rows), gate_sites, batch_size=s.batch_size))
        n_gate = len(gate_rows[0])
    extra = direction_inputs(s.source, [x for g in groups.values() for x in g])

    metrics: dict = {"baseline": {op: {"rate_own": float(a.own_hits["test"].mean()),
                                        "rate_goal": float(a.goal_hits["test"].mean())} for op, a in arms.items()}}
    metrics["measure"], metrics["contrast"] = s.measure, s.contrast
    if s.contrast == "correct":  # the fitting classes: train target prompts the tuned model answers right / wrong
        metrics["correct_split"] = {"right": len(rows["train_target"]), "wrong": len(rows["train_control"])}
    for op, b in metrics["baseline"].items():
        if b["rate_own"] == b["rate_goal"]:
            print(f"steer: warning: the {op} arm's model and its goal have the same {s.measure} on the test prompts "
                  f"({b['rate_own']:.3f}), so its effects are undefined: raise steer.max_new_tokens (room for the "
                  "answer) or steer.max_prompts", flush=True)
    grid, best_rows = [], []
    def refit(which: str, handles: list, site: Site) -> np.ndarray:
        """The fitting rows' activations at `site` with upstream handles acting (group_handles, several sites)."""
        iv = intervention(handles, 1.0)
        iv = from_first(iv) if s.from_token == "first" else iv
        return collect_decision_acts(models[which][0], encs[which], fit_rows, [site], batch_size=s.batch_size,
                                     intervene=iv)[site.name]

    for name, group in groups.items():
        @functools.cache  # a several-site group refits through the models: once per k
        def handles_for(k: int, group=group) -> dict:
            return group_handles(group, acts["base"], acts["tuned"], k, source=s.source, n_target=n_t,
                                 groups=target_groups, extra=extra, affine=s.affine, ablation=s.ablation,
                                 refit=refit)

        rows_g = sweep(arms, handles_for, s.k_sweep, s.alpha_grid, ppl_budget=s.ppl_budget, mc_budget=s.mc_budget,
                       progress=True, units=units.scoped(f"{name}/"))

        def summary_of(group=group, handles_for=handles_for, rows_g=rows_g) -> tuple[dict, list]:
            summary, best = summarise(rows_g, arms, handles_for, target=s.target_effect, k=s.k, n_boot=s.n_boot,
                                      seed=p.seed, ppl_budget=s.ppl_budget, mc_budget=s.mc_budget)
            gate_site = Site(group[0].layer, "resid_pre")
            summary["conditional"] = conditional(
                arms["steer"], handles_for(summary["steer"]["k"])["steer"], summary["steer"]["alpha"], gate_site,
                gate_acts[gate_site.name][:n_gate], gate_acts[gate_site.name][n_gate:], seed=p.seed)
            summary["robustness"] = robustness(arms, handles_for, summary,
                                               forms=[prompt_form(prompts[i].text) for i in rows["test"]])
            return summary, best

        summary, best = units(f"{name}/summary", summary_of)
        metrics[name] = summary
        grid += [{"config": name, **r} for r in rows_g]
        best_rows += [{"config": name, **r} for r in best]
    k_rows, alpha_rows = report_rows(grid, best_rows, metrics)
    write_csv(P.plot("steer_k.csv"), k_rows)
    write_csv(P.plot("steer_alpha.csv"), alpha_rows)
    write_csv(P.plot("steer_grid.csv"), grid)
    metrics["seconds"] = time.time() - t0
    write_json(P.metric("steer.json"), metrics)
    units.done()
    for name in groups:
        for op in ("steer", "ablate"):
            m = metrics[name][op]
            print(f"steer: {name:<16} {op:<6} min k {m['min_k']} | k={m['k']} alpha={m['alpha']} "
                  f"effect {m['effect'][0]:.3f} ppl {m['ppl_change']:+.3f} mc {m['mc_drop']:+.3f}")


if __name__ == "__main__":
    run_stage(main)
