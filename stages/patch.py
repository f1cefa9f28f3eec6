"""Stage patch: raw vs mapped patch KL per site, rank-k and alpha sweeps, min_k."""

import numpy as np

import mechdiff.pipeline as P
from mechdiff.analysis.patching import kl_drop, min_k, reference_logits, sweep_kl
from mechdiff.analysis.transport import load_map, recolour
from mechdiff.data.store import ActStore
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.load import load_saved
from mechdiff.model.sites import Site
from mechdiff.params import load_params, rank_value
from mechdiff.pipeline import allowed_ids, encode_prompts, kept_prompts, pick_rows
from mechdiff.report.html import plot_series


def _alpha_key(a) -> str:
    return "auto" if a == "auto" else f"{float(a):g}"


def main() -> None:
    p = load_params()
    pp = p.patch
    base = ActStore.open(P.acts_path("base"))
    prompts = kept_prompts()
    rows = pick_rows(prompts, split="val", n=pp.max_prompts, seed=p.seed)
    datasets = np.array([prompts[r].dataset for r in rows])
    model, tok = load_saved(P.model_dir("tuned"))
    enc = encode_prompts(tok, prompts, chat=p.data.chat, max_len=p.data.max_len)
    _, allowed = allowed_ids()
    ranks = list(dict.fromkeys([*pp.ranks, p.rank]))
    alphas = list(dict.fromkeys([*pp.alphas, p.alpha]))
    metrics: dict = {}
    rank_rows, alpha_rows = [], []
    for site_name in p.transport.sites:
        site = Site.parse(site_name)
        m = load_map(P.map_dir(site_name))
        X = base.read(site_name, "last", rows)
        d = X.shape[1]
        configs = {"raw": recolour(X, m.stats)}
        for k in ranks:
            for a in alphas:
                mk = m.at_rank(rank_value(k))
                if a != "auto":
                    mk = mk.with_alpha(float(a))
                configs[f"k={k}|a={_alpha_key(a)}"] = mk.apply(X)
        ref = reference_logits(model, enc, rows, batch_size=pp.batch_size)
        kls = sweep_kl(model, enc, rows, site, configs, ref, allowed=allowed, batch_size=pp.batch_size)
        raw = kls["raw"]
        a_main = _alpha_key(p.alpha)
        drops = {}
        for k in ranks:
            for a in alphas:
                res = kl_drop(raw, kls[f"k={k}|a={_alpha_key(a)}"], n_boot=pp.n_boot, seed=p.seed)
                kx = d if k == "full" else int(k)
                if _alpha_key(a) == a_main:
                    drops[k] = res["drop_pct"]
                    rank_rows.append({"site": site_name, "k": kx, "k_label": str(k), "kl_drop": res["drop_pct"],
                                      "ci_low": res["ci_low"], "ci_high": res["ci_high"]})
                alpha_rows.append({"site": site_name, "alpha": _alpha_key(a), "k": kx, "kl_drop": res["drop_pct"]})
        main = kl_drop(raw, kls[f"k={p.rank}|a={a_main}"], n_boot=pp.n_boot, seed=p.seed)
        ks = [d if k == "full" else int(k) for k in ranks]
        mk_ = min_k(ks, [drops[k] for k in ranks], pp.target_drop)
        site_metrics = {
            "kl_raw": main["kl_raw"], "kl_mapped": main["kl_mapped"], "kl_drop": main["drop_pct"],
            "kl_drop_ci_low": main["ci_low"], "kl_drop_ci_high": main["ci_high"],
            "kl_drop_full": drops.get("full", float("nan")),
            "min_k": -1 if mk_ is None else int(mk_),
            "alpha": m.alpha if p.alpha == "auto" else float(p.alpha),
        }
        for ds in sorted(set(datasets)):
            sel = datasets == ds
            if sel.sum() >= 2:
                r = kl_drop(raw[sel], kls[f"k={p.rank}|a={a_main}"][sel], n_boot=pp.n_boot, seed=p.seed)
                site_metrics[f"kl_drop_{ds}"] = r["drop_pct"]
        metrics[site_name] = site_metrics
        write_csv(P.plot(f"rank_k/{site_name}.csv"), [r for r in rank_rows if r["site"] == site_name])
        print(f"patch: {site_name}: drop at rank {p.rank} = {main['drop_pct']:.1f}%  min_k = {site_metrics['min_k']}")
    metrics["rank"] = p.rank if p.rank != "full" else -1
    write_csv(P.plot("rank_k.csv"), rank_rows)
    write_csv(P.plot("alpha.csv"), alpha_rows)
    plot_series(P.plot("rank_k.csv"), P.plot("rank_k.png"), x="k", y="kl_drop", group="site",
                title=f"KL drop % of the mapped patch vs rank k (alpha={p.alpha})", logx=True)
    write_json(P.metric("patch.json"), metrics)


if __name__ == "__main__":
    run_stage(main)
