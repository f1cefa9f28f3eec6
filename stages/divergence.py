"""Stage divergence: CKA by layer and site, next-token KL by dataset, and the RQ1 layer patch."""

import numpy as np

import mechdiff.pipeline as P
from mechdiff.analysis.onset import cka_onset, kl_onset, most_changed_layers
from mechdiff.analysis.patching import (
    LAYER_PATCH_DIRECTIONS,
    layer_patch_decisions,
    layer_patch_direction,
    layer_patch_table,
)
from mechdiff.analysis.similarity import cka_by_site, kl_by_dataset, next_token_kl
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.fast import pack_for_inference
from mechdiff.model.load import load_saved
from mechdiff.model.sites import Site
from mechdiff.params import load_params
from mechdiff.pipeline import allowed_ids, encode_prompts, kept_prompts, pick_rows
from mechdiff.report.plots import plot_series


def main() -> None:
    p = load_params()
    d = p.divergence
    stores = dict(zip(("base", "tuned"), P.open_stores()))
    base, tuned = stores["base"], stores["tuned"]
    prompts = kept_prompts()

    units = P.stage_units("divergence")  # an interrupted run resumes each site's CKA and each finished direction
    cka = cka_by_site(base, tuned, n_boot=d.n_boot, seed=p.seed, units=units)
    resid = {r["site"]: Site.parse(r["site"]).kind == "resid_post" for r in cka}
    write_csv(P.plot("cka.csv"), [r for r in cka if resid[r["site"]]])
    write_csv(P.plot("cka_sites.csv"), [r for r in cka if not resid[r["site"]]])
    metrics: dict = {"cka": {r["site"]: {"last": r["cka_last"], "mean": r["cka_mean"]} for r in cka}}

    # next-token KL(tuned || base) at the decision token, per prompt
    allowed = dict(zip(("base", "tuned"), allowed_ids()))
    kl = next_token_kl(tuned.read_logits(), base.read_logits(), allowed["tuned"], allowed["base"])
    kl_rows, metrics["kl"] = kl_by_dataset(kl, [q.dataset for q in prompts], n_boot=d.n_boot, seed=p.seed)
    write_csv(P.plot("kl_by_dataset.csv"), kl_rows)

    # RQ1 layer patch, both directions, on val prompts; recolour statistics from train prompts only
    lp_rows, flip_rows = [], []
    if d.layer_patch_prompts > 0:
        rows = pick_rows(prompts, split="val", n=d.layer_patch_prompts, seed=p.seed)
        train = pick_rows(prompts, split="train")
        layer_sites = [s for s in map(Site.parse, base.sites) if s.kind == "resid_post"]

        def one_direction(src: str, dst: str):
            model, tok = load_saved(P.model_dir(dst), dtype=p.pair.dtype)
            pack_for_inference(model)
            enc = encode_prompts(tok, prompts, chat=p.data.chat, max_len=p.data.max_len)
            return layer_patch_direction(model, enc, stores[src], stores[dst], layer_sites, rows, train,
                                         allowed=allowed[dst], allowed_src=allowed[src], batch_size=p.extract.batch_size)

        results = {direction: units(f"layer_patch/{direction}", lambda src=src, dst=dst: one_direction(src, dst))
                   for direction, (src, dst) in LAYER_PATCH_DIRECTIONS.items()}
        lp_rows, metrics["layer_patch"] = layer_patch_table(results)
        flip_rows, metrics["layer_patch_decisions"] = layer_patch_decisions(results)
    write_csv(P.plot("layer_patch.csv"), lp_rows)
    write_csv(P.plot("layer_patch_flip.csv"), flip_rows)
    plot_series(P.plot("cka.csv"), P.plot("cka.png"), x="layer", y=["cka_last", "cka_mean"],
                title="CKA(base, tuned) by layer, resid_post")
    first, low = cka_onset(metrics["cka"])
    metrics["onset"] = {"cka_layer": None if first is None else Site.parse(first).layer, "cka_site": first,
                        "cka_lowest_site": low, "cka_top_layers": most_changed_layers(metrics["cka"]),
                        "layer_patch_layer": kl_onset(metrics.get("layer_patch", {}).get("base_into_tuned", {}))}
    write_json(P.metric("divergence.json"), metrics)
    units.done()
    print(f"divergence: KL cultural {metrics['kl'].get('cultural', np.nan):.4f} "
          f"control {metrics['kl'].get('control', np.nan):.4f}")
    for direction, dd in metrics.get("layer_patch_decisions", {}).items():
        flips = {k: v for k, v in dd["flip"].items() if v is not None}
        top = max(flips, key=flips.get) if flips else None
        print(f"divergence: layer patch {direction}: the two models decide alike on {dd['agree_before']:.0%} of the "
              f"prompts; of the other {dd['n_differ']}, the patch makes the src model's decision "
              + (f"most at {top} ({flips[top]:.0%})" if top else "nowhere measurable"))


if __name__ == "__main__":
    run_stage(main)
