"""Stage patch: raw vs mapped patch KL per site, rank-k and alpha sweeps, min_k and the saturation rank; at attn_out
sites optionally per head through pinv(W_o) (`patch.attn_heads`)."""

import functools

import mechdiff.pipeline as P
from mechdiff.analysis.patching import head_blend, rank_alpha_sweep, reference_logits
from mechdiff.analysis.transport import load_map
from mechdiff.data.store import ActStore
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.fast import pack_for_inference
from mechdiff.model.load import load_saved
from mechdiff.model.sites import Site, attention_heads
from mechdiff.params import load_params
from mechdiff.pipeline import allowed_ids, encode_prompts, kept_prompts, pick_rows
from mechdiff.report.plots import plot_series


def main() -> None:
    p = load_params()
    pp = p.patch
    base = ActStore.open(P.acts_path("base"))
    prompts = kept_prompts()
    rows = pick_rows(prompts, split="val", n=pp.max_prompts, seed=p.seed)
    model, tok = load_saved(P.model_dir("tuned"), device=p.patch.device, dtype=p.pair.dtype)
    pack_for_inference(model)  # CPU: linear layers on weights packed once (mechdiff.model.kernels)
    enc = encode_prompts(tok, prompts, chat=p.data.chat, max_len=p.data.max_len)
    _, allowed = allowed_ids()
    units = P.stage_units("patch")  # an interrupted run resumes the reference logits and each finished site
    ref = functools.cache(lambda: units("ref", lambda: reference_logits(model, enc, rows, batch_size=pp.batch_size)))

    def sweep_site(site: Site, name: str, blend) -> tuple[list, list, dict]:
        return rank_alpha_sweep(
            model, enc, rows, site, load_map(P.map_dir(name)), base.read(name, "last", rows), ranks=pp.ranks,
            alphas=pp.alphas, rank=p.rank, alpha=p.alpha, target_drop=pp.target_drop, allowed=allowed,
            datasets=[prompts[r].dataset for r in rows], n_boot=pp.n_boot, seed=p.seed, batch_size=pp.batch_size,
            ref_logits=ref(), saturation=pp.saturation, blend=blend)

    metrics: dict = {}
    rank_rows, alpha_rows = [], []
    heads, tuned = None, None
    if pp.attn_heads is not None:
        if not any(Site.parse(s).kind == "attn_out" for s in p.transport.sites):
            print("patch: patch.attn_heads is set but no transport.sites entry is an attn_out site: it changes nothing")
        else:
            heads = attention_heads(model)
            if pp.attn_heads != "all" and max(pp.attn_heads) >= heads.n_heads:
                raise MechdiffError(f"params.yaml: patch.attn_heads {pp.attn_heads} names a head the tuned model lacks: "
                                    f"it has {heads.n_heads} heads per layer (0..{heads.n_heads - 1})")
            tuned = ActStore.open(P.acts_path("tuned"))
    for site_name in p.transport.sites:
        site = Site.parse(site_name)
        blend = None
        if heads is not None and site.kind == "attn_out":  # per-head parts, the other heads keep their own
            blend = head_blend(heads, site.layer, tuned.read(site_name, "last", rows), pp.attn_heads)
            d = heads.matrix(site.layer).shape[0]
            if blend.rank < d:
                print(f"patch: {site_name}: the output projection's split keeps {blend.rank} of {d} directions; "
                      "the rest of each patch vector is not patched")
        ranks, alphas, metrics[site_name] = units(f"site/{site_name}", functools.partial(sweep_site, site, site_name,
                                                                                     blend))
        if blend is not None:
            metrics[site_name]["attn_pinv_rank"] = blend.rank  # singular directions of W_o the split keeps
            if not blend.identified:  # heads wider than the stream: a subset's parts are not its own
                metrics[site_name]["attn_heads_identified"] = False
        rank_rows += ranks
        alpha_rows += alphas
        write_csv(P.plot(f"rank_k/{site_name}.csv"), ranks)
        print(f"patch: {site_name}: drop at rank {p.rank} = {metrics[site_name]['kl_drop']:.1f}%  "
              f"min_k = {metrics[site_name]['min_k']}, saturates at k = {metrics[site_name]['k_saturated']}")
    metrics["rank"] = p.rank if p.rank != "full" else -1
    write_csv(P.plot("rank_k.csv"), rank_rows)
    write_csv(P.plot("alpha.csv"), alpha_rows)
    plot_series(P.plot("rank_k.csv"), P.plot("rank_k.png"), x="k", y="kl_drop", group="site",
                title=f"KL drop % of the mapped patch vs rank k (alpha={p.alpha})", logx=True)
    write_json(P.metric("patch.json"), metrics)
    units.done()


if __name__ == "__main__":
    run_stage(main)
