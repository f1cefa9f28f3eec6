"""Stage divergence: CKA by layer and site, next-token KL by dataset, and the RQ1 layer patch."""

import numpy as np

import mechdiff.pipeline as P
from mechdiff.analysis.patching import layer_patch, reference_logits
from mechdiff.analysis.similarity import bootstrap_mean_ci, cka_bootstrap, kl_divergence
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.load import load_saved
from mechdiff.model.sites import Site
from mechdiff.params import load_params
from mechdiff.pipeline import allowed_ids, encode_prompts, kept_prompts, pick_rows
from mechdiff.report.html import plot_series


def main() -> None:
    p = load_params()
    d = p.divergence
    base, tuned = P.open_stores()
    prompts = kept_prompts()
    metrics: dict = {}
    rows_cka, rows_sites = [], []
    for name in base.sites:
        site = Site.parse(name)
        rec = {"layer": site.layer, "site": name}
        for view in ("last", "mean"):
            c, lo, hi = cka_bootstrap(base.read(name, view), tuned.read(name, view), n_boot=d.n_boot, seed=p.seed)
            rec.update({f"cka_{view}": c, f"cka_{view}_lo": lo, f"cka_{view}_hi": hi})
            metrics.setdefault("cka", {}).setdefault(name, {})[view] = c
        (rows_cka if site.kind == "resid_post" else rows_sites).append(rec)
    write_csv(P.plot("cka.csv"), rows_cka)
    write_csv(P.plot("cka_sites.csv"), rows_sites)

    # next-token KL(tuned || base) at the decision token, per prompt
    allowed_b, allowed_t = allowed_ids()
    lb, lt = base.read_logits(), tuned.read_logits()
    if allowed_b is not None:
        lb, lt = lb[:, allowed_b], lt[:, allowed_t]
    kl = kl_divergence(lt, lb)
    datasets = np.array([q.dataset for q in prompts])
    kl_rows = []
    for ds in ["all", *sorted(set(datasets))]:
        x = kl if ds == "all" else kl[datasets == ds]
        m, lo, hi = bootstrap_mean_ci(x, n_boot=d.n_boot, seed=p.seed)
        kl_rows.append({"dataset": ds, "kl_mean": m, "kl_lo": lo, "kl_hi": hi, "n": len(x)})
        metrics.setdefault("kl", {})[ds] = m
    write_csv(P.plot("kl_by_dataset.csv"), kl_rows)
    if "cultural" in metrics["kl"] and "control" in metrics["kl"]:
        metrics["kl"]["cultural_over_control"] = metrics["kl"]["cultural"] / max(metrics["kl"]["control"], 1e-12)

    # RQ1 layer patch, both directions, on val prompts
    lp_rows = []
    if d.layer_patch_prompts > 0:
        rows = pick_rows(prompts, split="val", n=d.layer_patch_prompts, seed=p.seed)
        layer_sites = [Site.parse(s) for s in base.sites if Site.parse(s).kind == "resid_post"]
        results = {}
        for direction, (dst, dst_store, src_store) in {
            "base_into_tuned": ("tuned", tuned, base),
            "tuned_into_base": ("base", base, tuned),
        }.items():
            model, tok = load_saved(P.model_dir(dst))
            enc = encode_prompts(tok, prompts, chat=p.data.chat, max_len=p.data.max_len)
            src_vecs = {s.name: src_store.read(s.name, "last", rows) for s in layer_sites}
            dst_stats = {s.name: dst_store.stats(s.name, "last") for s in layer_sites}
            src_stats = {s.name: src_store.stats(s.name, "last") for s in layer_sites}
            allowed = allowed_t if dst == "tuned" else allowed_b
            ref = reference_logits(model, enc, rows, batch_size=p.extract.batch_size)
            results[direction] = layer_patch(model, enc, rows, layer_sites, src_vecs, dst_stats, src_stats, ref,
                                             allowed=allowed, batch_size=p.extract.batch_size)
            del model
        for s in layer_sites:
            rec = {"layer": s.layer}
            for direction, res in results.items():
                rec[f"kl_{direction}"] = float(np.mean(res[s.name]))
                metrics.setdefault("layer_patch", {}).setdefault(direction, {})[f"L{s.layer}"] = rec[f"kl_{direction}"]
            lp_rows.append(rec)
    write_csv(P.plot("layer_patch.csv"), lp_rows)
    plot_series(P.plot("cka.csv"), P.plot("cka.png"), x="layer", y=["cka_last", "cka_mean"],
                title="CKA(base, tuned) by layer, resid_post")
    write_json(P.metric("divergence.json"), metrics)
    print(f"divergence: KL cultural {metrics['kl'].get('cultural', float('nan')):.4f} "
          f"control {metrics['kl'].get('control', float('nan')):.4f}")


if __name__ == "__main__":
    run_stage(main)
